"""Tamiyo: decision latency over the API, and policy training time per 1,000 experiences.

Run: `.venv/bin/python benchmarks/policy.py` (embedded default), or with `--served` and
DATABASE_URL/CELERY_BROKER_URL set for gunicorn + a Celery worker on Postgres + Redis
(the targets are for the served mode): decision p50 ≤ 20 ms, p99 ≤ 100 ms; training
≤ 30 s per 1,000 experiences.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import EmbeddedServer, ServedServer, p50, save
from torch import nn
from tqdm import tqdm

from kasmina import wrap
from kasmina.client import EsperClient
from tamiyo.graph import to_data
from tamiyo.policy import RandomPolicy
from tamiyo.training import train_policy


def graph_doc(seed: int) -> dict:
    """The decision request a real 4-layer MLP's runtime sends after two training steps."""
    torch.manual_seed(seed)
    model = wrap(
        nn.Sequential(
            nn.Linear(12, 24),
            nn.ReLU(),
            nn.Linear(24, 24),
            nn.ReLU(),
            nn.Linear(24, 24),
            nn.ReLU(),
            nn.Linear(24, 4),
        ),
        telemetry_every=1,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        model.step()
    return model.graph_document(
        progress=0.5, loss=0.9, loss_trend=0.0, val_metric=0.7, val_trend=0.0
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def decision_latency(server, n: int, warmup: int = 20) -> list[float]:
    client = EsperClient(server.url, server.token)
    run = client.request("POST", "runs/", json={"name": "bench-policy"})
    docs = [graph_doc(seed) for seed in range(4)]
    times = []
    for i in tqdm(range(warmup + n), desc="decisions", unit="req"):
        started = time.perf_counter()
        client.request("POST", f"runs/{run['id']}/decisions/", json={"graph": docs[i % 4]})
        if i >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    client.request("PATCH", f"runs/{run['id']}/", json={"status": "finished"})
    return times


def synthetic_experiences(n: int) -> list[dict]:
    """Random-policy decisions on real telemetry graphs; growth at layer '2' pays."""
    docs = [graph_doc(seed) for seed in range(8)]
    blueprints = [
        {"id": f"bp-{i}", "name": name, "graft": graft, "layout": "features"}
        for i, (name, graft) in enumerate(
            [
                ("residual-mlp-small", "residual"),
                ("residual-mlp-wide", "residual"),
                ("lowrank-adapter", "parallel"),
                ("parallel-widening-mlp", "parallel"),
            ]
        )
    ]
    policy, rng = RandomPolicy(), torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        doc = docs[i % len(docs)]
        d = policy.decide(to_data(doc), blueprints, rng=rng)
        reward = 0.0 if d.action == "wait" else (0.6 if d.layer == "2" else -0.4)
        out.append(
            {
                "state": doc,
                "blueprints": blueprints,
                "action": d.as_action(),
                "behavior_logprob": d.logprob,
                "reward": reward,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--served", action="store_true")
    parser.add_argument("--decisions", type=int, default=300)
    parser.add_argument("--experiences", type=int, default=1000)
    args = parser.parse_args()

    with ServedServer() if args.served else EmbeddedServer() as server:
        latencies = decision_latency(server, args.decisions)
    experiences = synthetic_experiences(args.experiences)
    started = time.perf_counter()
    result = train_policy(None, experiences, seed=0)
    train_s = time.perf_counter() - started

    out = {
        "decision_ms_p50": round(p50(latencies), 2),
        "decision_ms_p99": round(percentile(latencies, 0.99), 2),
        "train_s_per_1k": round(train_s * 1000 / len(experiences), 2),
        "mode": "served" if args.served else "embedded",
        "decisions": len(latencies),
        "experiences": len(experiences),
        "train_metrics": {k: v for k, v in result.metrics.items() if k != "history"},
        "targets": {"decision_ms_p50": 20, "decision_ms_p99": 100, "train_s_per_1k": 30},
    }
    path = save("policy", out)
    for key in ("decision_ms_p50", "decision_ms_p99", "train_s_per_1k", "mode"):
        print(f"{key:18} {out[key]}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
