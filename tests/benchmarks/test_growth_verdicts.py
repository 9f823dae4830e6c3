"""The growth benchmark's verdicts: what counts as beating random placement."""

import sys
from collections import Counter
from pathlib import Path

import pytest

from examples.morphogenesis import RunResult

pytestmark = pytest.mark.fast

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import growth  # noqa: E402


def _runs(accuracies, markers=None):
    return [
        RunResult(
            variant="v",
            dataset="digits",
            seed=seed,
            test_accuracy=acc,
            val_accuracy=acc,
            params=610,
            base_params=610,
            wall_s=1.0,
            epochs=1,
            steps_per_epoch=1,
            markers=list(markers or []),
            policies={"gnn": len(markers or [])},
        )
        for seed, acc in enumerate(accuracies)
    ]


def test_a_float_tie_is_not_a_win_and_beating_needs_most_seeds():
    random = _runs([0.95, 0.93, 0.94, 0.96, 0.92])
    # equal accuracies that differ in the last float32 bit are ties, not wins
    tie = growth.paired(_runs([a + 1e-9 for a in (0.95, 0.93, 0.94, 0.96, 0.92)]), random)
    assert tie["diff_pts_mean"] == 0 and tie["seeds_won"] == 0 and not tie["beats"]
    # a positive mean carried by one seed is not "beats"
    lucky = growth.paired(_runs([0.99, 0.92, 0.93, 0.96, 0.92]), random)
    assert lucky["diff_pts_mean"] > 0 and lucky["seeds_won"] == 1 and not lucky["beats"]
    better = growth.paired(_runs([0.96, 0.94, 0.95, 0.96, 0.91]), random)
    assert better["seeds_won"] == 3 and better["beats"]
    assert better["diff_pts_mean"] == pytest.approx(0.4)


def test_a_round_summary_counts_grafts_bridges_and_first_graft_steps():
    grafts = [
        {"blueprint": "bridge-mlp-8", "decided_step": 30},
        {"blueprint": "lowrank-adapter", "decided_step": 90},
    ]
    summary = growth.round_summary(_runs([0.9, 0.8], grafts) + _runs([0.7]))
    assert summary["grafts"] == 4 and summary["bridges"] == 2
    assert summary["first_graft_steps"] == [30, 30, None]
    assert summary["acc_mean"] == pytest.approx(80.0)
    assert summary["decided_by"] == {"gnn": 4}


def test_the_half_params_target_counts_a_gap_of_exactly_half_a_point_as_within():
    n = 360  # digits test split: accuracies are counts over 360
    large = growth.summarise("static_large", _runs([c / n for c in (350, 349, 350, 349, 349)]))
    large["params"] = 2410
    # 9 fewer correct predictions over the five seeds: exactly 0.5 points below
    grown = growth.summarise("grown", _runs([c / n for c in (348, 347, 348, 347, 348)]))
    verdict = growth.half_params_verdict({**grown, "params": 1202}, large)
    assert verdict == {
        "acc_gap_to_large_pts": 0.5,
        "params_ratio_to_large": 1202 / 2410,
        "met": True,
    }
    one_more_miss = growth.summarise("grown", _runs([c / n for c in (348, 347, 348, 347, 347)]))
    assert not growth.half_params_verdict({**one_more_miss, "params": 1202}, large)["met"]
    assert not growth.half_params_verdict({**large, "params": 1206}, large)["met"]


def test_the_frontier_lies_strictly_between_the_small_and_the_large_width():
    assert growth.frontier_widths(16) == [20, 24, 28, 30, 32, 48]
    assert growth.frontier_widths(8) == [10, 12, 14, 15, 16, 24]
    # rounding collapses widths of tiny models; none equals small or large
    assert growth.frontier_widths(2) == [3, 4, 6]


def test_each_setup_writes_its_own_result_files():
    assert growth.result_name("digits", growth.HIDDEN, growth.SEEDS) == "growth"
    assert growth.result_name("digits", 8, growth.SEEDS) == "growth-h8"
    assert growth.result_name("digits", growth.HIDDEN, 20) == "growth-seeds20"
    assert growth.result_name("mnist1d", 8, 20) == "growth-mnist1d-h8-seeds20"


def test_grow_all_at_once_takes_the_kernel_the_heuristic_kept_not_the_one_it_retried():
    picked = Counter({"residual-mlp-small": 13, "bridge-mlp-16": 8})
    kept = Counter({"bridge-mlp-16": 2, "residual-mlp-wide": 1})
    assert growth.all_at_once_choice(kept, picked) == "bridge-mlp-16"
    assert growth.all_at_once_choice(Counter(), picked) == "residual-mlp-small"
    assert growth.all_at_once_choice(Counter(), Counter()) == "lowrank-adapter"
