"""Controller: decisions, lifecycles, outcomes, outages and rollbacks against a live server."""

import copy
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina import Stage, wrap
from kasmina.client import EsperClient
from kasmina.controller import Controller

CLOSED_PORT = "http://127.0.0.1:1"  # nothing listens on port 1: connections are refused
LIFECYCLE = ["GERMINATED", "LOADING", "TRAINING", "BLENDING", "PROBATION"]


@pytest.fixture
def client(registry, token):
    """A client of the live server (real worker) that gives up quickly when it is down."""
    return EsperClient(registry.base_url, token.key, timeout=10, retries=1, backoff=0.05)


class _Loop:
    """A small MLP learning a synthetic 3-class task, grown by a Controller while it trains."""

    def __init__(self, client, **options):
        data = torch.Generator().manual_seed(0)
        x = torch.randn(1024, 8, generator=data)
        y = (x @ torch.randn(8, 3, generator=data) + 0.3 * torch.randn(1024, 3, generator=data))
        self.x, self.y = x[:768], y[:768].argmax(1)
        self.x_val, self.y_val = x[768:], y[768:].argmax(1)
        self.batches = torch.Generator().manual_seed(1)
        self.plain = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        # One seed site: the random policy can grow only there, once at a time.
        self.model = wrap(self.plain, ["0"], client=client, blend_steps=10, telemetry_every=10)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        settings = {
            "total_steps": 100_000,
            "decide_every": 25,
            "training_steps": 10,
            "probation_steps": 10,
            "policy": "random",
            "poll_interval": 0.1,
            "param_budget": 5_000,
            "eval_fn": self.accuracy,
        }
        self.controller = Controller(
            self.model, self.optimizer, client, run_name="test", **{**settings, **options}
        )
        self.step_seconds: list[float] = []

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
        started = time.perf_counter()
        self.controller.step(loss)
        self.step_seconds.append(time.perf_counter() - started)
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


def _rewarded(experience_id: str):
    from tamiyo.models import Experience

    return Experience.objects.filter(pk=experience_id, reward__isnull=False).first()


def test_a_germinate_decision_runs_the_lifecycle_without_blocking_and_is_rewarded(client):
    from tamiyo.models import Experience, TrainingRun

    loop = _Loop(client)
    controller = loop.controller
    loop.run_until(lambda: controller.adaptations)
    row = controller.adaptations[0]
    stages, compiling_steps = [], 0

    def watch() -> bool:
        nonlocal compiling_steps
        stage = loop.stage
        if not stages or stages[-1] != stage.name:
            stages.append(stage.name)
        compiling_steps += stage is Stage.GERMINATED
        if stage in (Stage.TRAINING, Stage.BLENDING, Stage.PROBATION):
            params = loop.model.seed_parameters("0", 0)
            assert params and loop.in_optimizer(params), "new parameters must train"
        return row["final_stage"] is not None

    loop.run_until(watch)
    assert stages == [*LIFECYCLE, row["final_stage"]]
    assert row["final_stage"] in ("FOSSILIZED", "CULLED")
    if row["final_stage"] == "FOSSILIZED":
        assert row["contribution"] > 0 and row["params_added"] > 0
        assert loop.in_optimizer(loop.model.seed_parameters("0", 0))
    else:
        assert row["contribution"] <= 0 and len(loop.optimizer.param_groups) == 1
    # Training went on while the kernel compiled, and no step waited on the network.
    assert compiling_steps >= 20
    assert max(loop.step_seconds) < 0.1, sorted(loop.step_seconds)[-5:]
    stats = controller.stats()
    assert stats["germinated"] == 1 and stats["median_decision_to_training_s"] > 0

    loop.run_until(lambda: _rewarded(row["experience"]), timeout=15)
    experience = _rewarded(row["experience"])
    assert experience.outcome["final_stage"] == row["final_stage"]
    assert experience.outcome["contribution"] == pytest.approx(row["contribution"])
    assert -1 <= experience.reward <= 1
    assert controller.close()
    run = TrainingRun.objects.get(pk=controller.run_id)
    assert run.status == "finished" and run.config["param_budget"] == 5_000
    assert run.metrics["controller"]["germinated"] == 1
    waits = Experience.objects.filter(run=run, action__action="wait", reward__isnull=False)
    assert waits.exists(), "wait decisions get their outcome too"


def test_an_unreachable_server_does_not_stop_training_and_writes_land_once_it_is_back(client):
    from tamiyo.models import Experience, TrainingRun

    up = client.base_url
    client.base_url = CLOSED_PORT
    loop = _Loop(client)
    controller = loop.controller
    for _ in range(40):
        loop.train_step()
    assert controller.steps == 40 and controller.run_id is None
    assert controller.stats()["pending_writes"] == 1 and not TrainingRun.objects.exists()

    client.base_url = up  # the run opens late; decisions and growth follow
    loop.run_until(lambda: loop.stage is Stage.TRAINING)
    row = controller.adaptations[0]
    client.base_url = CLOSED_PORT
    loop.run_until(lambda: row["final_stage"] is not None)
    for _ in range(20):
        loop.train_step()
    assert controller.stats()["pending_writes"] >= 1
    assert Experience.objects.get(pk=row["experience"]).outcome is None

    client.base_url = up
    loop.run_until(lambda: _rewarded(row["experience"]), timeout=30)
    assert _rewarded(row["experience"]).outcome["final_stage"] == row["final_stage"]
    assert controller.close()
    assert TrainingRun.objects.get(pk=controller.run_id).status == "finished"


def test_a_loss_spike_rolls_back_and_culls_the_seed_grafted_since_the_snapshot(client):
    loop = _Loop(client, snapshot_every=100_000, training_steps=100_000)  # snapshot at step 0
    controller = loop.controller
    loop.run_until(lambda: loop.stage is Stage.TRAINING)
    row = controller.adaptations[0]
    assert len(loop.optimizer.param_groups) == 2 and loop.optimizer.state

    controller.step(1e9)
    assert loop.stage is Stage.CULLED and row["final_stage"] == "CULLED" and row["rolled_back"]
    for restored, initial in zip(loop.model.parameters(), loop.plain.parameters(), strict=True):
        torch.testing.assert_close(restored, initial, rtol=0, atol=0)
    assert len(loop.optimizer.param_groups) == 1 and not loop.optimizer.state
    x = loop.x_val[:16]
    assert torch.equal(loop.model(x), loop.plain(x))
    assert controller.stats()["rollbacks"] == 1 and controller.history[-1]["rolled_back"]

    loop.run_until(lambda: _rewarded(row["experience"]), timeout=15)
    outcome = _rewarded(row["experience"]).outcome
    assert outcome["rolled_back"] is True and outcome["final_stage"] == "CULLED"
    assert controller.close()


def test_a_rejected_kernel_culls_the_seed_and_reports_a_failed_outcome(client):
    from urza.models import Kernel

    loop = _Loop(client)
    controller = loop.controller
    loop.run_until(lambda: controller.adaptations)
    row = controller.adaptations[0]
    assert loop.stage is Stage.GERMINATED  # its status is polled from the next step on
    Kernel.objects.filter(pk=row["kernel"]).update(status="rejected", error="test: refused")

    loop.run_until(lambda: row["final_stage"] is not None, timeout=15)
    assert row["final_stage"] == "CULLED" and loop.stage in (Stage.CULLED, Stage.EMBARGOED)
    assert len(loop.optimizer.param_groups) == 1 and controller.stats()["rejected"] == 1
    loop.run_until(lambda: _rewarded(row["experience"]), timeout=15)
    experience = _rewarded(row["experience"])
    assert experience.outcome["failures"] == 1 and experience.outcome["contribution"] is None
    assert experience.reward < 0
    assert controller.close()


def test_offline_a_non_finite_loss_restores_the_last_snapshot_of_model_and_optimizer():
    loop = _Loop(None, snapshot_every=5)
    for _ in range(30):
        loop.train_step()  # the 30th good step takes a snapshot
    params = [p.detach().clone() for p in loop.model.parameters()]
    state = copy.deepcopy(loop.optimizer.state_dict())

    loop.train_step(poison=True)
    assert loop.controller.stats()["rollbacks"] == 1
    for restored, saved in zip(loop.model.parameters(), params, strict=True):
        torch.testing.assert_close(restored, saved, rtol=0, atol=0)
    torch.testing.assert_close(loop.optimizer.state_dict(), state, rtol=0, atol=0)
    for _ in range(5):
        loop.train_step()
    assert all(h["loss"] == h["loss"] for h in loop.controller.history[-5:])
    assert loop.controller.run_id is None and loop.controller.close()
