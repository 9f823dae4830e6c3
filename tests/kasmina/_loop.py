"""A small training loop grown by a Controller, shared by the Controller tests."""

import time

import torch
from torch import nn
from torch.nn import functional as F

from kasmina import Controller, Stage, wrap


class Loop:
    """A small MLP learning a synthetic 3-class task, grown by a Controller while it trains."""

    def __init__(self, client, wrap_options=None, hidden: int = 32, scheduler=None, **options):
        data = torch.Generator().manual_seed(0)
        x = torch.randn(1024, 8, generator=data)
        y = x @ torch.randn(8, 3, generator=data) + 0.3 * torch.randn(1024, 3, generator=data)
        self.x, self.y = x[:768], y[:768].argmax(1)
        self.x_val, self.y_val = x[768:], y[768:].argmax(1)
        self.batches = torch.Generator().manual_seed(1)
        self.plain = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        # One seed site: the random policy can grow only there, once at a time.
        self.model = wrap(
            self.plain,
            ["0"],
            client=client,
            **{"blend_steps": 10, "telemetry_every": 10, **(wrap_options or {})},
        )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        settings = {
            "total_steps": 100_000,
            "decide_every": 25,
            "training_steps": 10,
            "probation_steps": 10,
            "policy": "random",
            "poll_interval": 0.1,
            "param_budget": 5_000,
            "eval_fn": self.accuracy,
            # Blending a random seed in can jump this small task's loss for real; rollback
            # has tests of its own, the others follow one seed through its lifecycle.
            "spike_factor": 50.0,
        }
        self.controller = Controller(
            self.model, self.optimizer, client, run_name="test", **{**settings, **options}
        )

    def accuracy(self) -> float:
        return (self.model(self.x_val).argmax(1) == self.y_val).float().mean().item()

    def train_step(self, poison: bool = False) -> None:
        idx = torch.randint(0, len(self.x), (64,), generator=self.batches)
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(self.x[idx]), self.y[idx])
        if poison:
            loss = loss * float("nan")
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.controller.step(loss)
        time.sleep(0.002)  # a step of real work, so decisions are not asked back to back

    def run_until(self, done, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out: {self.controller.stats()}"
            self.train_step()

    @property
    def stage(self) -> Stage:
        return self.model.layer("0").stages[0]

    def in_optimizer(self, params) -> bool:
        ids = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        return all(id(p) in ids for p in params)

    def only_host_in_optimizer(self) -> bool:
        """One param group holding exactly the host model's parameters (seeds gone)."""
        groups = self.optimizer.param_groups
        host = {id(p) for p in self.model.model.parameters()} - {
            id(p) for p in self.model.seed_parameters()
        }
        return len(groups) == 1 and {id(p) for p in groups[0]["params"]} == host
