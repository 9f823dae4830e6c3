"""Runtime overhead of Kasmina, as ratios measured interleaved in one run.

Run: `.venv/bin/python benchmarks/overhead.py` (starts the embedded default server for the
kernel and fetch measurements unless ESPER_URL/ESPER_TOKEN name one).

- dormant: wrapped model, every seed dormant, vs the plain model (MLP 784-512-512-10 at
  batch 128, and a small CNN); one training step = forward + backward + optimizer step.
- telemetry: the wrapped MLP with `model.step()` and telemetry sampled every 10 steps.
- active seed: a `residual-mlp-small` kernel from the registry grafted on the 512→512 layer
  at α = 1, vs the same adapter written by hand in plain PyTorch.
- cache hit: `KernelCache.get`; cold load: fetch over HTTP + sha256 + deserialise.

Targets: dormant ≤ 1.01, telemetry ≤ 1.03, active ≤ 1.10, cache hit ≤ 50 µs, cold ≤ 50 ms.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
from _common import EmbeddedServer, p50, save
from torch import nn
from tqdm import tqdm

from kasmina import Stage, wrap
from kasmina.cache import KernelCache
from kasmina.client import EsperClient
from kasmina.loader import KernelLoader


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


class HandAdapter(nn.Module):
    """What a researcher would write by hand: h + α·(W2 gelu(W1 h + b1) + b2)."""

    def __init__(self, host: nn.Linear, hidden: int) -> None:
        super().__init__()
        self.host = host
        self.down = nn.Linear(host.out_features, hidden)
        self.up = nn.Linear(hidden, host.out_features)
        self.register_buffer("alpha", torch.ones(()))

    def forward(self, x):
        h = self.host(x)
        return h + self.alpha * self.up(nn.functional.gelu(self.down(h)))


class Runner:
    """One model + optimizer + fixed batch; `run(k)` times k training steps."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, after_step=None):
        self.model, self.x, self.y, self.after_step = model, x, y, after_step
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.times: list[float] = []

    def run(self, k: int) -> None:
        loss_fn = nn.functional.cross_entropy
        started = time.perf_counter()
        for _ in range(k):
            self.opt.zero_grad(set_to_none=True)
            loss_fn(self.model(self.x), self.y).backward()
            self.opt.step()
            if self.after_step is not None:
                self.after_step()
        self.times.append((time.perf_counter() - started) / k)


def interleaved(runners: dict[str, Runner], *, baseline: str, rounds: int, steps: int, desc: str):
    """Median step time of each runner, and the median over rounds of each runner's time
    divided by the baseline's in the same round (paired, so slow drifts of a shared,
    noisy machine cancel out)."""
    for r in runners.values():
        r.run(steps)  # warm-up
        r.times.clear()
    names = list(runners)
    for _ in tqdm(range(rounds), desc=desc, unit="round"):
        random.shuffle(names)
        for name in names:
            runners[name].run(steps)
    times = {name: statistics.median(r.times) for name, r in runners.items()}
    base = runners[baseline].times
    ratios = {
        name: statistics.median(t / b for t, b in zip(r.times, base, strict=True))
        for name, r in runners.items()
        if name != baseline
    }
    return times, ratios


def compile_kernel_over_api(client: EsperClient) -> str:
    blueprint = next(b for b in client.list_blueprints(name="residual-mlp-small"))
    sig = {"graft": "residual", "layout": "features", "in": 512, "out": 512, "dtype": "float32"}
    kernel = client.request_kernel(blueprint.id, sig)
    kernel = client.wait_for_kernel(kernel.id, timeout=120)
    if kernel.status != "validated":
        raise RuntimeError(f"kernel {kernel.id} is {kernel.status}: {kernel.error}")
    return kernel.id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = least noise)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)

    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    xc, yc = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    base, base_cnn = mlp(), cnn()
    telemetry_model = wrap(base, telemetry_every=10)
    mlp_times, mlp_ratios = interleaved(
        {
            "plain": Runner(copy.deepcopy(base), x, y),
            "dormant": Runner(wrap(base), x, y),
            "telemetry": Runner(telemetry_model, x, y, after_step=telemetry_model.step),
        },
        baseline="plain",
        rounds=args.rounds,
        steps=args.steps,
        desc="mlp dormant/telemetry",
    )
    cnn_times, cnn_ratios = interleaved(
        {
            "plain": Runner(copy.deepcopy(base_cnn), xc, yc),
            "dormant": Runner(wrap(base_cnn), xc, yc),
        },
        baseline="plain",
        rounds=args.rounds,
        steps=args.steps,
        desc="cnn dormant",
    )

    with EmbeddedServer() as server:
        client = EsperClient(server.url, server.token)
        kernel_id = compile_kernel_over_api(client)
        cold = []
        for _ in range(15):
            loader = KernelLoader(client, KernelCache())
            started = time.perf_counter()
            loader.fetch(kernel_id)
            cold.append((time.perf_counter() - started) * 1000)
            loader.close()
        cache = KernelCache()
        loader = KernelLoader(client, cache)
        loader.fetch(kernel_id)
        hits = []
        for _ in range(2000):
            started = time.perf_counter()
            cache.get(kernel_id)
            hits.append((time.perf_counter() - started) * 1e6)

        active = wrap(base, target=["2"], loader=loader)
        active.load_kernel("2", 0, kernel_id)
        active.advance("2", 0, Stage.BLENDING)
        active.set_alpha("2", 0, 1.0)
        hand = copy.deepcopy(base)
        hand[2] = HandAdapter(hand[2], hidden=128)
        active_times, active_ratios = interleaved(
            {"handwritten": Runner(hand, x, y), "seed": Runner(active, x, y)},
            baseline="handwritten",
            rounds=args.rounds,
            steps=args.steps,
            desc="active seed",
        )
        loader.close()

    result = {
        "dormant_ratio_mlp": round(mlp_ratios["dormant"], 4),
        "dormant_ratio_cnn": round(cnn_ratios["dormant"], 4),
        "telemetry_ratio": round(mlp_ratios["telemetry"], 4),
        "active_vs_handwritten_ratio": round(active_ratios["seed"], 4),
        "cache_hit_us": round(p50(hits), 3),
        "cold_load_ms_p50": round(p50(cold), 2),
        "step_ms": {
            "mlp": {k: round(v * 1000, 4) for k, v in mlp_times.items()},
            "cnn": {k: round(v * 1000, 4) for k, v in cnn_times.items()},
            "active": {k: round(v * 1000, 4) for k, v in active_times.items()},
        },
        "targets": {
            "dormant_ratio": 1.01,
            "telemetry_ratio": 1.03,
            "active_vs_handwritten_ratio": 1.10,
            "cache_hit_us": 50,
            "cold_load_ms_p50": 50,
        },
        "config": {"rounds": args.rounds, "steps_per_round": args.steps, "threads": args.threads},
    }
    path = save("overhead", result)
    for key in (
        "dormant_ratio_mlp",
        "dormant_ratio_cnn",
        "telemetry_ratio",
        "active_vs_handwritten_ratio",
        "cache_hit_us",
        "cold_load_ms_p50",
    ):
        print(f"{key:30} {result[key]}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
