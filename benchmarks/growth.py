"""Growth: does growing a too-small MLP while it trains match a static model 4x wider?

Run: `.venv/bin/python benchmarks/growth.py` from the repo root (embedded default: a fresh
server in a temporary ESPER_HOME, real Celery worker threads; or `ESPER_URL`/`ESPER_TOKEN`).
Writes benchmarks/results/growth.json and benchmarks/results/growth.png (other setups get
their own files beside them: growth-seedsN.*, growth-hN.*, growth-mnist1d.*).

Data: scikit-learn digits, split 64/16/20 % train/val/test by each seed. Model: MLP
64-16-10 (the too-small one; `--hidden`) vs 64-64-10 (static large, 4x the hidden width).
Every variant trains with the same plain loop (Adam, lr 3e-3, batch 32, 40 epochs) and seeds:

  static_small       the small MLP
  static_large       the 4x wider MLP
  grown_heuristic    small MLP + Controller, Tamiyo's heuristic policy decides (forced)
  grown_random       small MLP + Controller, the random policy decides (forced)
  grow_all_at_once   small MLP, every seed site gets a kernel of one blueprint before the
                     first step (`MorphableModel.load_kernel`; no decisions): the blueprint
                     this run's grown_heuristic runs kept most often (else picked most often)
  grown_gnn          small MLP + Controller with policy "gnn", after `--gnn-rounds` (3)
                     rounds of the learning loop: each trains a policy version
                     (POST /policies/train/) on every experience recorded so far (the
                     heuristic and random runs, any `--explore-runs N` more random-policy
                     runs with other init seeds on the same splits, kept out of the table,
                     then the GNN's own earlier rounds) and runs the seeds with it; the
                     row is the last round, and the JSON has every round. The learning
                     rounds sample from the policy (exploration); the last one takes its
                     most likely action (`--final-round greedy`, the default; `sample`
                     samples there too). With `--gnn trained` (default) each version is pinned
                     (POST /policies/{v}/activate/) for its round even when the training
                     job kept it inactive (its held-out score was worse than the current
                     policy's), so the row measures the trained GNN; on a served deployment
                     the previously active version is restored afterwards. With
                     `--gnn active` the server's own choice decides (the heuristic when no
                     version is active). The JSON says which policy decided.
  grown_heuristic_greedy  (an extra row) the heuristic taking its top-scored action instead
                     of sampling at temperature 0.25, run after the GNN rounds so that
                     none of its experiences is trained on: grown_gnn's like-for-like row

A static frontier (the same loop for widths between small and large: 1.25, 1.5, 1.75,
1.875, 2 and 3 times the small width) shows what the first target asks for: how accurate a
model of a given size gets when it is trained from scratch at that size.

Why 16 and not 8: with a 64-8-10 start no MLP of half the large model's size gets within
0.5 points of 64-32-10 on digits (64-16-10, 5 parameters over the line, is 0.35 below on
seeds 0-19 and 0.64 on seeds 20-39), so that target measured the data set's noise, not growth. From 64-16-10
the small model is 0.9 points below 64-64-10 and a half-size model can reach the line;
`--hidden 8` runs the old setup.

Growth decisions and seed judgements use the validation split; the test split is read
once per run, after training. Before the measured runs every catalogue blueprint that fits
a seed site is compiled once (a registry in use has them cached); those cold compile times
are reported as `warmup`. Targets (the issue's): a grown variant within 0.5 accuracy points
of static_large with at most half its parameters; guided growth beats random placement;
median decision -> seed TRAINING time under 5 s.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
from _common import RESULTS, EmbeddedServer, save
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.morphogenesis import (  # noqa: E402
    LARGE_FACTOR,
    Growth,
    RunResult,
    activate_policy,
    active_policy,
    check_server,
    count_params,
    default_budget,
    load_dataset,
    make_mlp,
    request_policy_training,
    train,
    wait_for_policy,
    warm_registry,
)
from kasmina import wrap  # noqa: E402
from kasmina.errors import ApiError  # noqa: E402

VARIANTS = (
    "static_small",
    "static_large",
    "grown_heuristic",
    "grown_random",
    "grow_all_at_once",
    "grown_gnn",
)
# The knobs (tuned on the validation split); the growth knobs are `Growth`'s defaults.
EPOCHS, LR, BATCH = 40, 3e-3, 32
SEEDS = 5  # the reported runs; other counts write growth-seedsN.* beside them
HIDDEN = 16  # the too-small MLP's hidden width here (`--hidden`); the demo's is SMALL_HIDDEN (8)
FRONTIER = (1.25, 1.5, 1.75, 1.875, 2, 3)  # static widths between small and large, as multiples
EXPLORE_RUNS, EXPLORE_SEED = 0, 1000  # extra random-policy runs for the first policy version


def frontier_widths(hidden: int) -> list[int]:
    """Static hidden widths strictly between `hidden` and the large model's, for the frontier."""
    widths = {round(hidden * f) for f in FRONTIER}
    return sorted(w for w in widths if hidden < w < LARGE_FACTOR * hidden)


def result_name(dataset: str, hidden: int, seeds: int) -> str:
    """growth.json for the reported setup; other setups get their own file beside it."""
    name = "growth" if dataset == "digits" else f"growth-{dataset}"
    if hidden != HIDDEN:
        name += f"-h{hidden}"
    if seeds != SEEDS:
        name += f"-seeds{seeds}"
    return name


def all_at_once_choice(kept: Counter, picked: Counter) -> str:
    """grow_all_at_once's blueprint: the one the heuristic's runs kept most often, else the one
    they picked most often. Picks alone would favour a kernel that kept failing, since every
    retry after a cull is another pick."""
    for counts in (kept, picked):
        if counts:
            return counts.most_common(1)[0][0]
    return "lowrank-adapter"


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def stdev(values):
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(variant: str, runs: list[RunResult]) -> dict:
    policies = Counter()
    for r in runs:
        policies.update(r.policies)
    acc = [100 * r.test_accuracy for r in runs]
    return {
        "variant": variant,
        "acc_mean": mean(acc),
        "acc_std": stdev(acc),
        "params": mean([r.params for r in runs]),
        "params_max": max(r.params for r in runs),
        "wall_s": mean([r.wall_s for r in runs]),
        "adaptations_made": mean([r.adaptations_made for r in runs]),
        "adaptations_kept": mean([r.adaptations_kept for r in runs]),
        "adaptations_culled": mean([r.adaptations_culled for r in runs]),
        "adaptations_unfinished": mean([r.adaptations_unfinished for r in runs]),
        "val_acc_mean": mean([100 * r.val_accuracy for r in runs]),
        "rollbacks": sum(r.rollbacks for r in runs),
        "decided_by": dict(policies),
        "active_policy_at_start": sorted({r.active_policy for r in runs if r.active_policy}),
        "max_step_s": max((r.max_step_s for r in runs if r.max_step_s is not None), default=None),
        "blueprints_kept": dict(
            Counter(
                f"{m['layer']}:{m['blueprint']}"
                for r in runs
                for m in r.markers
                if m["final_stage"] == "FOSSILIZED"
            )
        ),
        "per_seed": [
            {
                "seed": r.seed,
                "acc": 100 * r.test_accuracy,
                "val_acc": 100 * r.val_accuracy,
                "params": r.params,
                "wall_s": r.wall_s,
                "made": r.adaptations_made,
                "kept": r.adaptations_kept,
                "rollbacks": r.rollbacks,
                "adaptations": r.markers,
            }
            for r in runs
        ],
        "val_curve": [
            mean([100 * r.epoch_accuracy[e] for r in runs])
            for e in range(len(runs[0].epoch_accuracy))
        ],
    }


def half_params_verdict(row: dict, large: dict) -> dict:
    """The first target for one summarised row: a mean test accuracy at most 0.5 points below
    `large`'s with at most half its (mean) parameter count. The gap is rounded to 1e-6
    points, so a gap of exactly 0.5 points (9 of the 1,800 test predictions over 5 digits
    seeds) is not lost to float rounding in the means."""
    gap = round(large["acc_mean"] - row["acc_mean"], 6)
    ratio = row["params"] / large["params"]
    return {
        "acc_gap_to_large_pts": gap,
        "params_ratio_to_large": ratio,
        "met": gap <= 0.5 and ratio <= 0.5,
    }


def paired(runs: list[RunResult], baseline: list[RunResult]) -> dict:
    """`runs` vs `baseline` seed by seed (the same data split and init seed): the mean
    accuracy difference in points, its standard error, and the seeds won. It `beats` the
    baseline when the mean difference is positive and it wins more than half the seeds.
    (Differences are rounded to 1e-6 points, so equal counts of correct predictions tie at 0
    even where the accuracies came from float32 arithmetic.)"""
    diff = [
        round(100 * (a.test_accuracy - b.test_accuracy), 6)
        for a, b in zip(runs, baseline, strict=True)
    ]
    won = sum(d > 0 for d in diff)
    return {
        "beats": statistics.fmean(diff) > 0 and won > len(diff) / 2,
        "diff_pts_mean": statistics.fmean(diff),
        "diff_pts_sem": stdev(diff) / len(diff) ** 0.5,
        "seeds_won": won,
        "seeds": len(diff),
    }


def plot(rows: list[dict], frontier: list[dict], path: Path, title: str, hidden: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_curve) = plt.subplots(1, 2, figsize=(13, 5))
    by_name = {r["variant"]: r for r in rows}
    large = by_name["static_large"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(rows):
        color = colors[i % len(colors)]
        label = f"{r['variant']} ({r['acc_mean']:.2f} ± {r['acc_std']:.2f})"
        ax.errorbar(
            r["params"],
            r["acc_mean"],
            yerr=r["acc_std"],
            fmt="o",
            capsize=4,
            color=color,
            label=label,
        )
        ax_curve.plot(
            range(1, len(r["val_curve"]) + 1), r["val_curve"], color=color, lw=1.5, label=label
        )
    static = sorted(
        [
            {"params": by_name[v]["params"], "acc_mean": by_name[v]["acc_mean"]}
            for v in ("static_small", "static_large")
        ]
        + frontier,
        key=lambda r: r["params"],
    )
    (frontier_line,) = ax.plot(
        [r["params"] for r in static],
        [r["acc_mean"] for r in static],
        color="gray",
        lw=1,
        ls="--",
        marker=".",
        label=f"static MLPs, hidden width {hidden}-{LARGE_FACTOR * hidden} (trained from scratch)",
        zorder=0,
    )
    # The variants' colours are those of the learning curves (legend on the right); a full
    # legend here would cover the grown points, which sit near the half-params line.
    ax.legend(handles=[frontier_line], fontsize=7, loc="lower right")
    ax.axhspan(large["acc_mean"] - 0.5, large["acc_mean"] + 0.5, color="tab:orange", alpha=0.12)
    ax.axvline(large["params"] / 2, color="gray", ls=":", lw=1)
    ax.text(
        large["params"] / 2,
        ax.get_ylim()[1],
        " half of static_large's params",
        fontsize=8,
        va="top",
    )
    ax.set_xscale("log")
    ax.set_xlabel("parameters in the final model (mean over seeds; log scale)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(
        "accuracy vs parameters (band: static_large ± 0.5 pts; colours as on the right)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel("validation accuracy (%), mean over seeds")
    ax_curve.set_title("learning curves", fontsize=10)
    ax_curve.set_ylim(max(0, min(min(r["val_curve"][2:]) for r in rows) - 2), None)
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_policy_version(client, args: argparse.Namespace, *, seed: int) -> dict:
    """One training job on every experience so far; with `--gnn trained` the new version is
    pinned (made active) even when the job kept it inactive."""
    t0 = time.monotonic()
    queued = request_policy_training(client, seed=seed)
    version = None
    if queued["queued"]:
        version = wait_for_policy(client, queued["known"], timeout=args.policy_timeout)
    training = {
        "requested_on_experiences": queued["experiences"],
        "queued": queued["queued"],
        "needed": queued.get("needed"),
        "seconds": time.monotonic() - t0,
        "version": version["version"] if version else None,
        "activated": bool(version and version["is_active"]),
        "pinned": False,
        "experience_count": version["experience_count"] if version else None,
        "metrics": {k: v for k, v in (version or {}).get("metrics", {}).items() if k != "history"},
    }
    if args.gnn == "trained" and version is not None and not version["is_active"]:
        try:
            activate_policy(client, version["version"])
            training["pinned"] = True
        except ApiError as exc:  # a non-staff token on a served deployment
            training["pin_error"] = exc.message
    return training


def round_summary(runs: list[RunResult]) -> dict:
    grafts = [m for r in runs for m in r.markers]
    return {
        "acc_mean": mean([100 * r.test_accuracy for r in runs]),
        "params": mean([r.params for r in runs]),
        "grafts": len(grafts),
        "bridges": sum(m["blueprint"].startswith("bridge") for m in grafts),
        "first_graft_steps": [r.markers[0]["decided_step"] if r.markers else None for r in runs],
        "decided_by": dict(sum((Counter(r.policies) for r in runs), Counter())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seeds",
        type=int,
        default=SEEDS,
        help=f"seeds 0..N-1 (default {SEEDS}, the reported runs; other counts write "
        "growth-seedsN.*)",
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument(
        "--hidden",
        type=int,
        default=HIDDEN,
        help=f"the too-small MLP's hidden width; static large is {LARGE_FACTOR}x it (default "
        f"{HIDDEN}, the reported setup; others write growth-hN.*)",
    )
    parser.add_argument("--policy-timeout", type=float, default=300.0)
    parser.add_argument(
        "--dataset",
        choices=("digits", "mnist1d"),
        default="digits",
        help="digits (the reported numbers) or MNIST-1D (needs the optional mnist1d package; "
        "writes growth-mnist1d.json/.png)",
    )
    parser.add_argument(
        "--gnn",
        choices=("trained", "active"),
        default="trained",
        help="grown_gnn decides with the version this run trains, pinned for the measurement "
        "(trained; needs a staff token on a served deployment), or with the server's active "
        "policy (active)",
    )
    parser.add_argument(
        "--gnn-rounds",
        type=int,
        default=3,
        help="rounds of train-then-run for grown_gnn; the row reports the last (default 3)",
    )
    parser.add_argument(
        "--final-round",
        choices=("greedy", "sample"),
        default="greedy",
        help="how the last round (the grown_gnn row) decides: the policy's most likely action "
        "(greedy, default) or a sample like the learning rounds before it",
    )
    parser.add_argument(
        "--explore-runs",
        type=int,
        default=EXPLORE_RUNS,
        help="extra random-policy runs, not in the table, whose experiences the first policy "
        f"version also trains on (default {EXPLORE_RUNS}; 0 for none)",
    )
    args = parser.parse_args()
    if args.gnn_rounds < 1:
        parser.error("--gnn-rounds must be at least 1")
    if args.hidden < 2:
        parser.error("--hidden must be at least 2")
    if args.explore_runs < 0:
        parser.error("--explore-runs must be at least 0")
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    started = time.monotonic()
    seeds = list(range(args.seeds))
    datasets = {s: load_dataset(args.dataset, s) for s in seeds}
    data0 = datasets[0]
    hidden = args.hidden
    widths = frontier_widths(hidden)
    budget = default_budget(data0, hidden)
    small = count_params(make_mlp(data0.n_features, hidden, data0.n_classes))
    large = count_params(make_mlp(data0.n_features, LARGE_FACTOR * hidden, data0.n_classes))
    sites = wrap(make_mlp(data0.n_features, hidden, data0.n_classes)).seed_layers
    signatures = {
        name: {**layer.signature, "bridge_from": getattr(layer.bridge_source, "layer_name", None)}
        for name, layer in sites.items()
    }
    results: dict[str, list[RunResult]] = {v: [] for v in VARIANTS}
    results.update({f"static_h{w}": [] for w in widths})
    gnn_variants = [f"grown_gnn_round{r + 1}" for r in range(args.gnn_rounds - 1)] + ["grown_gnn"]
    results.update({v: [] for v in gnn_variants[:-1]}, exploration=[], grown_heuristic_greedy=[])
    server_env = {"TAMIYO_TRAIN_EVERY": "0", "TAMIYO_TRAIN_SCHEDULE_S": "0"}  # train on cue

    with EmbeddedServer(env=server_env, staff=True) as server:
        client = check_server(server.url, server.token)
        t0 = time.monotonic()
        warm = warm_registry(client, sites)
        warm_s = time.monotonic() - t0
        bar = tqdm(
            total=(len(VARIANTS) + 1 + len(widths) + args.gnn_rounds - 1) * len(seeds)
            + args.explore_runs,
            desc="growth",
            unit="run",
        )

        def run(
            variant: str, seed: int, hidden: int, growth: Growth | None, split: int | None = None
        ) -> None:
            bar.set_postfix_str(f"{variant} seed {seed}")
            results[variant].append(
                train(
                    datasets[seed if split is None else split],
                    hidden=hidden,
                    variant=variant,
                    epochs=args.epochs,
                    seed=seed,
                    lr=LR,
                    batch_size=BATCH,
                    growth=growth,
                    client=client,
                    run_name=f"growth-{variant}-seed{seed}",
                )
            )
            bar.update(1)

        for seed in seeds:
            run("static_small", seed, hidden, None)
            run("static_large", seed, LARGE_FACTOR * hidden, None)
            for width in widths:
                run(f"static_h{width}", seed, width, None)
        for seed in seeds:
            for policy in ("heuristic", "random"):
                growth = Growth(policy=policy, param_budget=budget)
                run(f"grown_{policy}", seed, hidden, growth)
        heuristic_markers = [m for r in results["grown_heuristic"] for m in r.markers]
        picked = Counter(m["blueprint"] for m in heuristic_markers)
        kept = Counter(
            m["blueprint"] for m in heuristic_markers if m["final_stage"] == "FOSSILIZED"
        )
        all_at_once_blueprint = all_at_once_choice(kept, picked)
        for seed in seeds:
            growth = Growth(all_at_once=True, blueprint=all_at_once_blueprint, param_budget=budget)
            run("grow_all_at_once", seed, hidden, growth)

        for i in range(args.explore_runs):  # more of the action space for the first version
            growth = Growth(policy="random", param_budget=budget)
            run("exploration", EXPLORE_SEED + i, hidden, growth, split=seeds[i % len(seeds)])

        previous = active_policy(client)
        rounds: list[dict] = []
        for number, variant in enumerate(gnn_variants, start=1):
            bar.set_postfix_str(f"training the policy (round {number})")
            training = train_policy_version(client, args, seed=number - 1)
            if training["version"] is None and number < len(gnn_variants):
                bar.update((len(gnn_variants) - number) * len(seeds))
                variant = "grown_gnn"  # too few experiences: one round with the server's choice
            greedy = variant == "grown_gnn" and args.final_round == "greedy"
            for seed in seeds:
                growth = Growth(policy="gnn", greedy=greedy, param_budget=budget)
                run(variant, seed, hidden, growth)
            rounds.append({**training, **round_summary(results[variant]), "greedy": greedy})
            if variant == "grown_gnn":
                break
        # The heuristic deciding greedily too, after the rounds so that its experiences are
        # not in what the policy versions trained on: the like-for-like row for grown_gnn.
        for seed in seeds:
            growth = Growth(policy="heuristic", greedy=True, param_budget=budget)
            run("grown_heuristic_greedy", seed, hidden, growth)
        policy_training = rounds[-1]
        if any(r["pinned"] for r in rounds) and previous is not None and not server.started:
            activate_policy(client, previous["version"])  # leave a deployment as it was
        bar.close()
        served = not server.started

    rows = [summarise(v, results[v]) for v in (*VARIANTS, "grown_heuristic_greedy")]
    frontier = [
        {
            "hidden": w,
            "params": results[f"static_h{w}"][0].params,
            "acc_mean": mean([100 * r.test_accuracy for r in results[f"static_h{w}"]]),
            "acc_std": stdev([100 * r.test_accuracy for r in results[f"static_h{w}"]]),
        }
        for w in widths
    ]
    by_name = {r["variant"]: r for r in rows}
    grown = ("grown_heuristic", "grown_random", *gnn_variants, "grown_heuristic_greedy")
    grown_runs = [r for v in grown for r in results[v]]
    cycles = [c for r in grown_runs for c in r.cycle_s]
    step_max = [r.max_step_s for r in grown_runs if r.max_step_s is not None]

    within_half = [f for f in frontier if f["params"] <= by_name["static_large"]["params"] / 2]
    best_static = max(within_half, key=lambda f: f["acc_mean"], default=None)
    gnn_decided = by_name["grown_gnn"]["decided_by"]
    targets = {
        "grown_within_0.5_pts_of_large_at_half_params": {
            v: half_params_verdict(by_name[v], by_name["static_large"])
            for v in ("grown_gnn", "grown_heuristic", "grown_heuristic_greedy", "grown_random")
        },
        "guided_beats_random": {
            v: paired(results[v], results["grown_random"])
            for v in ("grown_gnn", "grown_heuristic", "grown_heuristic_greedy")
        },
        "cycle_s_median_under_5": bool(cycles) and statistics.median(cycles) < 5.0,
        # The first target against models trained from scratch at that size: the best
        # static MLP with at most half of static_large's parameters.
        "static_at_half_params": best_static
        and {
            "hidden": best_static["hidden"],
            "params": best_static["params"],
            "acc_gap_to_large_pts": by_name["static_large"]["acc_mean"] - best_static["acc_mean"],
        },
    }
    payload = {
        "rows": rows,
        "static_frontier": frontier,
        "cycle_s_median": statistics.median(cycles) if cycles else None,
        "cycle_s_p90": statistics.quantiles(cycles, n=10)[-1] if len(cycles) > 1 else None,
        "cycle_count": len(cycles),
        "controller_step_max_s": max(step_max) if step_max else None,
        "controller_step_max_s_median_over_runs": statistics.median(step_max) if step_max else None,
        "targets": targets,
        "policy_training": policy_training,
        "gnn_rounds": rounds,
        "exploration": {"runs": args.explore_runs, **round_summary(results["exploration"])}
        if results["exploration"]
        else {"runs": 0},
        "grown_gnn_decided_by": gnn_decided,
        "grown_gnn_active_policy_at_start": by_name["grown_gnn"]["active_policy_at_start"],
        "all_at_once_blueprint": all_at_once_blueprint,
        "heuristic_blueprint_picks": dict(picked),
        "heuristic_blueprints_kept": dict(kept),
        "warmup": {
            "seconds": warm_s,
            "compile_s_median": statistics.median([w["seconds"] for w in warm if "seconds" in w])
            if any("seconds" in w for w in warm)
            else None,
            "kernels": warm,
        },
        "config": {
            "dataset": args.dataset,
            "split": {k: len(getattr(data0, f"y_{k}")) for k in ("train", "val", "test")},
            "seeds": seeds,
            "epochs": args.epochs,
            "lr": LR,
            "batch_size": BATCH,
            "small": {"hidden": hidden, "params": small},
            "large": {"hidden": LARGE_FACTOR * hidden, "params": large},
            "param_budget": budget,
            "growth": {
                k: v
                for k, v in asdict(Growth()).items()
                if k not in ("policy", "all_at_once", "blueprint", "param_budget")
            },
            "seed_sites": signatures,
            "server": "served (ESPER_URL)" if served else "embedded default",
        },
        "total_s": time.monotonic() - started,
    }
    name = result_name(args.dataset, hidden, args.seeds)
    path = save(name, payload)
    plot(
        rows,
        frontier,
        RESULTS / f"{name}.png",
        f"{args.dataset}, MLP {data0.n_features}-{hidden}-{data0.n_classes} grown vs "
        f"static; {len(seeds)} seeds, {args.epochs} epochs",
        hidden,
    )
    print(f"\n{'variant':<18}{'test acc %':>16}{'params':>9}{'wall s':>8}{'made':>6}{'kept':>6}")
    for r in rows:
        print(
            f"{r['variant']:<18}{r['acc_mean']:>9.2f} ± {r['acc_std']:<4.2f}{r['params']:>9.0f}"
            f"{r['wall_s']:>8.2f}{r['adaptations_made']:>6.1f}{r['adaptations_kept']:>6.1f}"
        )
    for f in frontier:
        print(
            f"{'static h' + str(f['hidden']):<18}{f['acc_mean']:>9.2f} ± {f['acc_std']:<4.2f}{f['params']:>9}"
        )
    print(
        f"cycle (decision -> TRAINING) median {payload['cycle_s_median']} s over {len(cycles)}; "
        f"slowest controller.step {payload['controller_step_max_s']} s"
    )
    for v, t in targets["guided_beats_random"].items():
        print(
            f"{v} - grown_random: {t['diff_pts_mean']:+.2f} ± {t['diff_pts_sem']:.2f} pts "
            f"(paired, won {t['seeds_won']}/{t['seeds']} seeds)"
        )
    if results["exploration"]:
        e = payload["exploration"]
        print(
            f"exploration: {e['runs']} random-policy runs, {e['acc_mean']:.2f} %, "
            f"{e['grafts']} grafts ({e['bridges']} bridges)"
        )
    for number, r in enumerate(rounds, start=1):
        print(
            f"gnn round {number}: v{r['version']} on {r['experience_count']} experiences, "
            f"activated by the job {r['activated']}, pinned {r['pinned']}: "
            f"{r['acc_mean']:.2f} %, {r['grafts']} grafts ({r['bridges']} bridges)"
        )
    print(f"grown_gnn decided by {gnn_decided}")
    print(f"wrote {path} and {RESULTS / f'{name}.png'} in {payload['total_s']:.0f} s")


if __name__ == "__main__":
    main()
