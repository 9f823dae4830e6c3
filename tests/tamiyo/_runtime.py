"""Graph documents built from a real wrapped model's telemetry, as the runtime sends them."""

import torch
from torch import nn

from kasmina import wrap


def trained_wrapped_model(seed: int = 0, *, seeds_per_layer: int = 1):
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
        seeds_per_layer=seeds_per_layer,
        telemetry_every=1,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 12), torch.randint(0, 4, (32,))
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        model.step()
    return model


def health_snapshot(seed: int = 0, **kw) -> dict:
    return trained_wrapped_model(seed, **kw).health()


def graph_doc(health: dict, **globals_) -> dict:
    base = {
        "progress": 0.5,
        "loss": 0.9,
        "loss_trend": 0.0,
        "val_metric": 0.7,
        "val_trend": 0.0,
        "budget_used": 0.0,
    }
    return {
        "schema": "esper.graph/1",
        "step": health["step"],
        "layers": health["layers"],
        "globals": {**base, **globals_},
    }
