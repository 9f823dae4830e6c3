"""`make demo`: train a too-small MLP three ways against a live Esper server, then train Tamiyo.

    .venv/bin/python -m examples.demo [--dataset digits|mnist1d] [--epochs N] [--seed N]
                                      [--policy gnn|heuristic|random] [--server URL --token KEY]

Without --server (and without ESPER_URL) it starts the embedded default as a child process
(`manage.py serve` on a free port: SQLite under ./.esper, in-process broker, real Celery worker
threads), so experiences accumulate in ./.esper across demo runs. It trains

  static small   the too-small MLP, plain PyTorch
  static large   the same MLP with 4x the hidden width
  grown          the small MLP wrapped by kasmina and driven by a Controller: Tamiyo decides
                 where to grow, the worker compiles the kernel, the runtime grafts it, trains
                 it, blends it in and keeps or culls it on its measured contribution

prints a table and the plot's path, asks the server to train a new policy version from the
stored experiences (POST /api/v1/policies/train/), waits for it and prints its held-out score.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python examples/demo.py` as well as `python -m examples.demo`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from examples.morphogenesis import (  # noqa: E402
    DATASETS,
    LARGE_FACTOR,
    SMALL_HIDDEN,
    Growth,
    RunResult,
    SetupError,
    active_policy,
    check_server,
    default_budget,
    load_dataset,
    make_mlp,
    request_policy_training,
    train,
    wait_for_policy,
    warm_registry,
)
from kasmina import wrap  # noqa: E402
from kasmina.errors import KasminaError  # noqa: E402

# The embedded default's folder: ./.esper unless ESPER_HOME says otherwise (as for the server).
DEMO_HOME = Path(os.environ.get("ESPER_HOME") or ROOT / ".esper").resolve()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make demo",
        description="Train a too-small MLP static, 4x wider, and grown by Esper; then train "
        "Tamiyo's policy from the recorded experiences.",
        epilog="Flags reach `make demo` as DEMO_ARGS='--epochs 20 --policy random'.",
    )
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--epochs", type=int, default=40, help="epochs per variant (40)")
    parser.add_argument("--seed", type=int, default=0, help="data split and init seed (0)")
    parser.add_argument(
        "--policy",
        choices=("gnn", "heuristic", "random"),
        default="gnn",
        help="who decides growth: gnn = the active trained policy (the server falls back "
        "to the heuristic while none is active)",
    )
    parser.add_argument(
        "--server", default=os.environ.get("ESPER_URL"), help="a running server (ESPER_URL)"
    )
    parser.add_argument(
        "--token", default=os.environ.get("ESPER_TOKEN"), help="its API token (ESPER_TOKEN)"
    )
    parser.add_argument(
        "--plot", type=Path, default=DEMO_HOME / "demo.png", help="where the PNG goes"
    )
    parser.add_argument(
        "--train-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the new policy version (300)",
    )
    parser.add_argument("--no-train", action="store_true", help="skip the policy training step")
    parser.add_argument("--verbose", action="store_true", help="log the runtime's warnings")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.server and not args.token:
        parser.error(
            "--server needs --token (or ESPER_TOKEN); `manage.py esper_token USER` prints one"
        )
    return args


# -- output ------------------------------------------------------------------------------
def table(results: list[RunResult]) -> str:
    head = ("variant", "test acc", "params", "wall s", "adaptations", "kept")
    rows = [
        (
            r.variant,
            f"{100 * r.test_accuracy:.2f} %",
            f"{r.params:,}",
            f"{r.wall_s:.1f}",
            str(r.adaptations_made) if r.variant == "grown" else "-",
            str(r.adaptations_kept) if r.variant == "grown" else "-",
        )
        for r in results
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]

    def line(cells) -> str:
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(head), line("-" * w for w in widths), *map(line, rows)])


def plot(results: list[RunResult], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    colors = {"static small": "tab:blue", "static large": "tab:orange", "grown": "tab:purple"}
    for r in results:
        color = colors.get(r.variant)
        losses = torch.tensor(r.losses)
        window = max(1, r.steps_per_epoch)
        smooth = torch.nn.functional.avg_pool1d(
            losses[None, None], window, stride=1, padding=0, count_include_pad=False
        )[0, 0]
        ax_loss.plot(range(1, len(losses) + 1), losses, color=color, alpha=0.15, lw=0.6)
        ax_loss.plot(range(window, len(losses) + 1), smooth, color=color, lw=1.6, label=r.variant)
        epochs_x = [(e + 1) * r.steps_per_epoch for e in range(len(r.epoch_accuracy))]
        ax_acc.plot(epochs_x, [100 * a for a in r.epoch_accuracy], color=color, lw=1.6)
    styles = {
        "FOSSILIZED": ("tab:green", "-", "kept (fossilized)"),
        "CULLED": ("tab:red", "--", "culled"),
        None: ("tab:gray", ":", "still in its lifecycle at the end"),
    }
    used = set()
    for r in results:
        for m in r.markers:
            step = m["training_step"] if m["training_step"] is not None else m["decided_step"]
            color, style, _ = styles.get(m["final_stage"], styles[None])
            used.add(m["final_stage"] if m["final_stage"] in styles else None)
            end = m["finished_step"] or (len(r.losses) if m["final_stage"] is None else None)
            for ax in (ax_loss, ax_acc):
                ax.axvline(step, color=color, ls=style, lw=1.0, alpha=0.8)
                if end is not None and end > step:  # the seed's lifecycle until judged
                    ax.axvspan(step, end, color=color, alpha=0.06, lw=0)
            ax_acc.annotate(
                f"{m['layer']}: {m['blueprint']}",
                (step, 0.02),
                xycoords=("data", "axes fraction"),
                rotation=90,
                fontsize=7,
                color=color,
                ha="right",
                va="bottom",
            )
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss (per step; line: 1-epoch mean)")
    handles, labels = ax_loss.get_legend_handles_labels()
    for key in (k for k in styles if k in used):
        color, style, label = styles[key]
        handles.append(Line2D([], [], color=color, ls=style))
        labels.append(f"adaptation {label}")
    ax_loss.legend(handles, labels, loc="upper right", fontsize=8)
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_acc.set_xlabel(
        "training step (line: a grafted seed starts TRAINING; shade: until it is kept or culled)"
    )
    ax_acc.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def warm(client, data) -> None:
    """Compile the catalogue for the small MLP's seed sites (instant when already cached)."""
    sites = wrap(make_mlp(data.n_features, SMALL_HIDDEN, data.n_classes)).seed_layers
    bar = tqdm(desc="compiling kernels (Tezzeret worker)", unit="kernel", leave=False)

    def done(i: int, n: int) -> None:
        bar.total = n
        bar.update(i - bar.n)

    started = time.monotonic()
    try:
        rows = warm_registry(client, sites, on_done=done)
    finally:
        bar.close()
    ready = [r for r in rows if r.get("status") == "validated"]
    slowest = max((r["seconds"] for r in ready), default=0.0)
    layers = ", ".join(
        f"{n} {la.signature['in']}->{la.signature['out']}" for n, la in sites.items()
    )
    print(
        f"registry: {len(ready)}/{len(rows)} kernels validated for layers {layers} in "
        f"{time.monotonic() - started:.1f} s (slowest {slowest:.1f} s; cached ones are instant)"
    )


def describe_policy(requested: str, grown: RunResult) -> str:
    decided = grown.policies
    counts = ", ".join(f"{n} by {p}" for p, n in sorted(decided.items())) or "no growth decided"
    if requested == "gnn":
        meant = grown.active_policy or "heuristic"
        note = (
            " (no trained policy is active yet, so the server falls back to the heuristic)"
            if meant == "heuristic"
            else ""
        )
        return f"policy: asked for gnn; the server decided with {meant}{note}; germinate: {counts}"
    return f"policy: {requested} (forced); germinate: {counts}"


# -- the job -----------------------------------------------------------------------------
def run(args: argparse.Namespace, url: str, token: str) -> int:
    client = check_server(url, token)
    data = load_dataset(args.dataset, args.seed)
    budget = default_budget(data)
    growth = Growth(policy=args.policy, param_budget=budget)
    sizes = data.sizes()
    print(
        f"data: {args.dataset} (train {sizes['train']}, val {sizes['val']}, test "
        f"{sizes['test']}), {data.n_features} features, {data.n_classes} classes; "
        f"{args.epochs} epochs, seed {args.seed}"
    )
    if args.policy == "gnn":
        version = active_policy(client)
        print(
            f"active policy: gnn v{version['version']}"
            if version
            else "active policy: none trained yet -> the heuristic decides"
        )
    warm(client, data)
    variants = [
        ("static small", SMALL_HIDDEN, None),
        ("static large", LARGE_FACTOR * SMALL_HIDDEN, None),
        ("grown", SMALL_HIDDEN, growth),
    ]
    results = []
    for name, hidden, grow in variants:
        bar = tqdm(total=args.epochs, desc=f"{name:>12}", unit="epoch", leave=True)

        def progress(p: dict, bar=bar, grow=grow) -> None:
            post = {"loss": f"{p['loss']:.3f}", "val_acc": f"{100 * p['accuracy']:.1f}%"}
            if grow is not None:
                post["adaptations"] = p["made"]
                post["kept"] = p["kept"]
            bar.set_postfix(post, refresh=False)
            bar.update(1)

        try:
            results.append(
                train(
                    data,
                    hidden=hidden,
                    variant=name,
                    epochs=args.epochs,
                    seed=args.seed,
                    growth=grow,
                    client=client,
                    run_name=f"demo-{args.dataset}-{args.policy}-seed{args.seed}",
                    progress=progress,
                )
            )
        finally:
            bar.close()
    grown = results[-1]
    print()
    print(table(results))
    print()
    print(describe_policy(args.policy, grown))
    for m in grown.markers:
        contribution = (
            f"{100 * m['contribution']:+.2f} pts" if m["contribution"] is not None else "n/a"
        )
        cycle = (
            f"{m['decision_to_training_s']:.2f} s"
            if m["decision_to_training_s"] is not None
            else "-"
        )
        print(
            f"  step {m['decided_step']:>5}  {m['layer']}[{m['seed']}] {m['blueprint']:<22} "
            f"{m['final_stage'] or 'unfinished':<10} contribution {contribution:<11} "
            f"+{m['params_added']} params  decision->training {cycle}"
        )
    title = (
        f"Esper demo: {args.dataset}, MLP hidden {SMALL_HIDDEN} vs "
        f"{LARGE_FACTOR * SMALL_HIDDEN} vs grown ({args.policy})"
    )
    print(f"\nplot: {plot(results, args.plot, title)}")
    if args.no_train:
        return 0
    return train_policy(client, args)


def train_policy(client, args: argparse.Namespace) -> int:
    print("\ntraining Tamiyo's policy from the recorded experiences ...")
    answer = request_policy_training(client, seed=args.seed)
    if not answer["queued"]:
        need = answer["needed"]
        more = f"; {need - answer['experiences']} more needed" if need else ""
        print(
            f"not yet: the server has {answer['experiences']} rewarded experiences and "
            f"trains from {need or 'more'}{more}. Run `make demo` again (each run adds some)."
        )
        return 0
    print(f"queued on {answer['experiences']} rewarded experiences")
    bar = tqdm(total=None, desc="waiting for the new version", unit="s", leave=False)

    def tick(waited: float) -> None:
        bar.update(int(waited) - bar.n)

    started = time.monotonic()
    try:
        version = wait_for_policy(client, answer["known"], timeout=args.train_timeout, on_poll=tick)
    finally:
        bar.close()
    if version is None:
        print(
            f"no new policy version after {args.train_timeout:.0f} s; is a worker consuming "
            "the `train` queue? (`make worker` in served mode)",
            file=sys.stderr,
        )
        return 1
    metrics = version.get("metrics") or {}

    def fmt(key: str) -> str:
        value = metrics.get(key)
        return f"{value:.4f}" if isinstance(value, int | float) else str(value)

    print(
        f"policy v{version['version']} trained in {time.monotonic() - started:.1f} s on "
        f"{version['experience_count']} experiences: "
        f"{'ACTIVATED' if version['is_active'] else 'kept inactive'}"
    )
    print(
        f"  held-out score {fmt('heldout_score_candidate')} vs {fmt('heldout_score_current')} "
        f"for the current policy ({metrics.get('compared_with')}); held-out loss "
        f"{fmt('heldout_loss')}, {metrics.get('train_count')} train / "
        f"{metrics.get('heldout_count')} held-out experiences"
    )
    if not version["is_active"]:
        print("  (a version is activated only when it scores no worse than the current one)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.verbose else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
    )
    torch.set_num_threads(1)  # a tiny MLP; leave the other core to the server and its worker
    started = time.monotonic()
    try:
        if args.server:
            print(f"server: {args.server}")
            code = run(args, args.server, args.token)
        else:
            from benchmarks._common import EmbeddedServer

            print(f"starting the embedded server (ESPER_HOME={DEMO_HOME}) ...", flush=True)
            with EmbeddedServer(DEMO_HOME, user="admin", password="esper-admin") as server:
                print(f"server: {server.url} (log: {server.log_path})")
                code = run(args, server.url, server.token)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KasminaError as exc:
        print(f"error: the server failed during the demo: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"error: preparing the embedded database failed ({exc})", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
