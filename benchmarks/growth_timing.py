"""What growing late costs: new hidden units added at epoch e of 40, in plain PyTorch.

Run: `.venv/bin/python benchmarks/growth_timing.py` from the repo root (about 2 minutes;
no server). Writes benchmarks/results/growth_timing.json (`--hidden 8`: growth_timing-h8.json;
`--seeds N` other than 10: -seedsN).

The growth benchmark's first target asks a grown model to come within 0.5 points of the
static MLP 4x wider than the small one (64-64-10 for the default 64-16-10) with at most
half its parameters. This isolates the two costs that target runs into, without Esper in
the loop: models of half that size trained from scratch (64-32-10), and the small model
with as many hidden units again added at epoch 0, 3, 5, 10 or 16 -- the units a
`bridge-mlp-16` graft adds (fc1's input -> 16 ReLU units -> fc2's output, no biases,
output weights starting at zero), joining the Adam optimizer when they appear. Same data
splits, loop and seeds as `growth.py` (Adam, lr 3e-3, batch 32, 40 epochs), 10 seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import save
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.morphogenesis import load_dataset  # noqa: E402

EPOCHS, LR, BATCH = 40, 3e-3, 32
GROW_EPOCHS = (0, 3, 5, 10, 16)
HIDDEN, SEEDS = 16, 10  # the growth benchmark's small width; the reported seed count


class Bridged(nn.Module):
    """64-h-10 MLP, plus `units` hidden ReLU units from the input to the output once on."""

    def __init__(self, n_in: int, hidden: int, n_out: int, units: int = 0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(n_in, hidden), nn.Linear(hidden, n_out)
        self.units = units
        if units:
            self.b1 = nn.Linear(n_in, units, bias=False)
            self.b2 = nn.Linear(units, n_out, bias=False)
            nn.init.zeros_(self.b2.weight)
        self.grown = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(torch.relu(self.fc1(x)))
        if self.grown:
            y = y + self.b2(torch.relu(self.b1(x)))
        return y


def run(seed: int, hidden: int, units: int = 0, grow_epoch: int | None = None) -> float:
    data = load_dataset("digits", seed)
    torch.manual_seed(seed)
    net = Bridged(data.n_features, hidden, data.n_classes, units)
    base = [net.fc1.weight, net.fc1.bias, net.fc2.weight, net.fc2.bias]
    optimizer = torch.optim.Adam(base, lr=LR)
    generator = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    for epoch in range(EPOCHS):
        if units and epoch == grow_epoch:
            net.grown = True
            optimizer.add_param_group({"params": [net.b1.weight, net.b2.weight]})
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, BATCH):
            idx = order[i : i + BATCH]
            loss = nn.functional.cross_entropy(net(data.x_train[idx]), data.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return 100 * (net(data.x_test).argmax(1) == data.y_test).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument(
        "--hidden", type=int, default=HIDDEN, help=f"the small width (default {HIDDEN})"
    )
    args = parser.parse_args()
    if args.hidden < 1 or args.seeds < 1:
        parser.error("--hidden and --seeds must be at least 1")
    torch.set_num_threads(1)
    started = time.monotonic()
    h = args.hidden
    configs = {
        f"static_h{4 * h}": {"hidden": 4 * h},
        f"static_h{2 * h}": {"hidden": 2 * h},
        f"static_h{h}": {"hidden": h},
        **{
            f"h{h}_plus_{h}_at_epoch_{e}": {"hidden": h, "units": h, "grow_epoch": e}
            for e in GROW_EPOCHS
        },
    }
    rows = []
    for name, config in configs.items():
        acc = [run(seed, **config) for seed in range(args.seeds)]
        net = Bridged(64, config["hidden"], 10, config.get("units", 0))
        rows.append(
            {
                "variant": name,
                **config,
                "params": sum(p.numel() for p in net.parameters()),
                "acc_mean": statistics.fmean(acc),
                "acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "acc": acc,
            }
        )
        print(
            f"{name:<24}{rows[-1]['params']:>6}{rows[-1]['acc_mean']:>8.2f} ± {rows[-1]['acc_std']:.2f}"
        )
    large = rows[0]["acc_mean"]
    payload = {
        "rows": rows,
        "gap_to_large_pts": {r["variant"]: large - r["acc_mean"] for r in rows[1:]},
        "config": {
            "dataset": "digits",
            "epochs": EPOCHS,
            "lr": LR,
            "batch_size": BATCH,
            "seeds": list(range(args.seeds)),
            "hidden": h,
        },
        "total_s": time.monotonic() - started,
    }
    name = "growth_timing" + (f"-h{h}" if h != HIDDEN else "")
    name += f"-seeds{args.seeds}" if args.seeds != SEEDS else ""
    print(f"wrote {save(name, payload)} in {payload['total_s']:.0f} s")


if __name__ == "__main__":
    main()
