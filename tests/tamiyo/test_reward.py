import math

import pytest
from torch.testing import assert_close

from tamiyo.reward import RewardWeights, compute_reward, terminal_credit


def germinate(**over) -> dict:
    outcome = {
        "final_stage": "FOSSILIZED",
        "contribution": 0.02,
        "metric_before": 0.80,
        "metric_after": 0.82,
        "params_added": 1000,
        "failures": 0,
        "rolled_back": False,
    }
    return {**outcome, **over}


def test_fossilized_seed_worth_two_points_using_a_tenth_of_the_budget():
    # x = 0.02 − 0.005 · 1000 / 10000 = 0.0195; tanh(20 · 0.0195) = tanh(0.39)
    reward = compute_reward(germinate(), action="germinate", param_budget=10_000)
    assert_close(reward, 0.3713602278765077)


def test_a_seed_worth_a_point_for_the_whole_budget_is_rewarded_and_one_worth_less_is_not():
    # break-even: the whole budget for half a point (x = 0.01 − 0.005 > 0; 0.004 − 0.005 < 0)
    whole = {"params_added": 600, "contribution": 0.01}
    assert compute_reward(germinate(**whole), action="germinate", param_budget=600) > 0
    less = {"params_added": 600, "contribution": 0.004}
    assert compute_reward(germinate(**less), action="germinate", param_budget=600) < 0


def test_failures_and_rollback_are_charged():
    # x = 0.05 − 0.01 · 2 − 0.05 = −0.02; tanh(−0.4)
    outcome = germinate(contribution=0.05, params_added=0, failures=2, rolled_back=True)
    assert_close(compute_reward(outcome, action="germinate"), -0.3799489622552249)


def test_without_a_budget_parameters_are_not_charged():
    outcome = germinate(contribution=0.01, params_added=10**9)
    assert_close(compute_reward(outcome, action="germinate"), 0.197375320224904)


def test_a_seed_that_never_reached_probation_counts_zero_contribution():
    outcome = germinate(final_stage="CULLED", contribution=None, failures=1, params_added=0)
    assert_close(compute_reward(outcome, action="germinate", param_budget=100), -0.197375320224904)


def test_wait_is_judged_by_the_metric_change():
    reward = compute_reward({"metric_before": 0.80, "metric_after": 0.83}, action="wait")
    assert_close(reward, 0.5370495669980341)


def test_waiting_through_a_flat_stretch_costs_a_little():
    # |Δ| = 0.0005 < flat_tol: x = 0.0005 − 0.002; tanh(20 · −0.0015)
    reward = compute_reward({"metric_before": 0.8, "metric_after": 0.8005}, action="wait")
    assert_close(reward, -0.029991003238821246)


def test_custom_weights_change_the_formula():
    weights = RewardWeights(scale=1.0, lambda_params=1.0)
    reward = compute_reward(germinate(), action="germinate", param_budget=1000, weights=weights)
    assert_close(reward, math.tanh(0.02 - 1.0))


def test_reward_stays_in_the_unit_interval():
    huge = compute_reward(germinate(contribution=1e6), action="germinate")
    awful = compute_reward(germinate(failures=10**6), action="germinate")
    assert huge == 1.0 and awful == -1.0


@pytest.mark.parametrize(
    ("outcome", "action", "message"),
    [
        ({"metric_before": 0.5}, "wait", r"outcome\.metric_after: missing field"),
        ({"metric_before": 0.5, "metric_after": 0.6, "x": 1}, "wait", r"outcome\.x: unknown"),
        (
            germinate(contribution=math.nan),
            "germinate",
            r"outcome\.contribution: expected a finite",
        ),
        (germinate(params_added=True), "germinate", r"outcome\.params_added"),
        (germinate(failures=-1), "germinate", r"outcome\.failures"),
        (germinate(rolled_back=0), "germinate", r"outcome\.rolled_back"),
        (germinate(final_stage="GONE"), "germinate", r"outcome\.final_stage"),
        (
            {k: v for k, v in germinate().items() if k != "failures"},
            "germinate",
            r"outcome\.failures: missing field",
        ),
        (germinate(), "prune", r"action: expected 'wait' or 'germinate'"),
        ([], "wait", r"outcome: expected an object"),
    ],
)
def test_malformed_outcomes_name_the_field(outcome, action, message):
    with pytest.raises(ValueError, match=message):
        compute_reward(outcome, action=action)


def test_budget_and_weights_are_validated():
    with pytest.raises(ValueError, match="param_budget"):
        compute_reward(germinate(), action="germinate", param_budget=0)
    with pytest.raises(ValueError, match=r"RewardWeights\.scale"):
        RewardWeights(scale=-1.0)


def _exp(run, final, reward=0.2, cohort="mlp", action="germinate"):
    return {
        "reward": reward,
        "action": {"action": action},
        "run": run,
        "cohort": cohort,
        "final_metric": final,
    }


def test_terminal_credit_rates_each_run_against_the_other_runs_of_its_cohort():
    experiences = [
        _exp("a", 0.90),
        _exp("a", 0.90, reward=-0.4),
        _exp("b", 0.95),
        _exp("c", 1.00),
        _exp("d", 0.50, cohort="other"),  # alone in its cohort: nothing to compare with
        _exp("e", None),  # no final metric (still running, failed, or an old run)
        _exp("c", 1.00, reward=None),  # unrewarded: left for training to skip
        _exp("c", 1.00, action="wait"),  # a wait keeps its step reward
    ]
    out, summary = terminal_credit(experiences, weight=0.5, scale=20.0)

    def blended(reward, final, others):
        return 0.5 * reward + 0.5 * math.tanh(20.0 * (final - sum(others) / len(others)))

    assert out[0]["reward"] == pytest.approx(blended(0.2, 0.90, [0.95, 1.00]))
    assert out[1]["reward"] == pytest.approx(blended(-0.4, 0.90, [0.95, 1.00]))
    assert out[2]["reward"] == pytest.approx(blended(0.2, 0.95, [0.90, 1.00]))
    assert out[3]["reward"] == pytest.approx(blended(0.2, 1.00, [0.90, 0.95]))
    assert out[0]["reward"] < out[2]["reward"] < out[3]["reward"]
    assert [e["reward"] for e in out[4:]] == [0.2, 0.2, None, 0.2]
    assert summary == {"weight": 0.5, "credited": 4, "runs": 3, "cohorts": 1}
    assert experiences[0]["reward"] == 0.2, "the input is not modified"
    unchanged, summary = terminal_credit(experiences, weight=0.0)
    assert [e["reward"] for e in unchanged] == [e["reward"] for e in experiences]
    assert summary["credited"] == 0


@pytest.mark.parametrize(
    ("experiences", "options", "message"),
    [
        ([_exp("a", 0.9)], {"weight": 1.5}, "terminal weight must be in"),
        ([_exp("a", 0.9)], {"scale": 0.0}, "terminal scale must be"),
        ([_exp("a", "high")], {}, r"experiences\[0\]\.final_metric: expected a finite number"),
        ([_exp("a", math.nan)], {}, r"experiences\[0\]\.final_metric"),
        ([_exp("a", 0.9), _exp("a", 0.8)], {}, "run 'a' has two final metrics"),
    ],
)
def test_terminal_credit_rejects_bad_input_with_a_clear_error(experiences, options, message):
    with pytest.raises(ValueError, match=message):
        terminal_credit(experiences, **options)


@pytest.mark.parametrize(
    ("over", "says"),
    [
        (
            {"metric_after": 10**400},
            "outcome.metric_after: expected a finite number, got an integer",
        ),
        ({"contribution": -(10**400)}, "outcome.contribution: expected a finite number"),
        (
            {"params_added": 2**60},
            "outcome.params_added: expected an integer in [0, 9007199254740992]",
        ),
        ({"failures": 10**400}, "outcome.failures: expected an integer in [0,"),
    ],
)
def test_numbers_beyond_any_float_are_a_value_error_not_an_overflow(over, says):
    with pytest.raises(ValueError) as info:
        compute_reward(germinate(**over), action="germinate")
    assert str(info.value).startswith(says) and len(str(info.value)) < 200
