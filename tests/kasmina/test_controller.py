"""Controller: decisions, lifecycles, outcomes, outages and rollbacks against a live server."""

import copy
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kasmina import Stage
from kasmina._outbox import Outbox, Write
from kasmina.client import EsperClient
from kasmina.errors import RegistryUnavailable
from tests.kasmina._loop import Loop

CLOSED_PORT = "http://127.0.0.1:1"  # nothing listens on port 1: connections are refused
LIFECYCLE = ["GERMINATED", "LOADING", "TRAINING", "BLENDING", "PROBATION"]


def _rewarded(experience_id: str):
    from tamiyo.models import Experience

    return Experience.objects.filter(pk=experience_id, reward__isnull=False).first()


def test_a_germinate_decision_runs_the_lifecycle_without_blocking_and_is_rewarded(make_loop):
    from tamiyo.models import Experience, TrainingRun

    loop = make_loop()
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
    # A failed fetch is retried (LOADING → ERROR_RECOVERY → LOADING): the same lifecycle.
    path = [s for s in stages if s != "ERROR_RECOVERY"]
    path = [s for i, s in enumerate(path) if i == 0 or path[i - 1] != s]
    assert path == [*LIFECYCLE, row["final_stage"]], stages
    assert row["final_stage"] in ("FOSSILIZED", "CULLED")
    if row["final_stage"] == "FOSSILIZED":
        assert row["contribution"] > 0 and row["params_added"] > 0
        assert loop.in_optimizer(loop.model.seed_parameters("0", 0))
    else:
        assert row["contribution"] <= 0 and loop.only_host_in_optimizer()
    # Training went on while the kernel compiled: its status was polled on later steps (how
    # many depends on the worker's speed; test_no_step_waits_on_a_request_that_hangs bounds
    # the blocking itself).
    assert compiling_steps >= 2
    stats = controller.stats()
    assert stats["germinated"] == 1 and stats["median_decision_to_training_s"] > 0

    loop.run_until(lambda: _rewarded(row["experience"]), timeout=15)
    experience = _rewarded(row["experience"])
    assert experience.outcome["final_stage"] == row["final_stage"]
    assert experience.outcome["contribution"] == pytest.approx(row["contribution"])
    assert -1 <= experience.reward <= 1
    # The one seed site is taken (or embargoed after a cull), so the next decisions are
    # waits; each gets its outcome `decide_every` steps later. (The random policy's first
    # decision may already have been the germinate, so none need exist yet.)
    waits = Experience.objects.filter(
        run_id=controller.run_id, action__action="wait", reward__isnull=False
    )
    loop.run_until(waits.exists, timeout=30)
    assert controller.close()
    run = TrainingRun.objects.get(pk=controller.run_id)
    assert run.status == "finished" and run.config["param_budget"] == 5_000
    assert run.metrics["controller"]["germinated"] == 1
    # The final validation metric, which policy training credits to the run's grafts.
    assert run.metrics["final_metric"] == loop.accuracy()
    assert waits.exists(), "wait decisions get their outcome too"


def test_an_unreachable_server_does_not_stop_training_and_writes_land_once_it_is_back(
    client, make_loop
):
    from tamiyo.models import Experience, TrainingRun

    up = client.base_url
    client.base_url = CLOSED_PORT
    loop = make_loop()
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


@pytest.fixture
def silent_server():
    """A server that accepts connections and never answers: every request hangs."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    listener.close()
    for conn in accepted:
        conn.close()


def test_no_step_waits_on_a_request_that_hangs(silent_server, token):
    url, accepted = silent_server
    client = EsperClient(url, token.key, timeout=30, retries=0)
    loop = Loop(client)
    for _ in range(60):
        loop.train_step()
    # Sixty steps ran while the run-opening request was still on the wire.
    deadline = time.monotonic() + 5
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(accepted) == 1 and loop.controller.steps == 60
    assert loop.controller.run_id is None and loop.controller.stats()["pending_writes"] == 1
    assert not loop.controller.close(timeout=0.2)


def test_a_caller_that_gives_up_stops_the_retries_against_a_hung_server(silent_server, token):
    url, accepted = silent_server
    client = EsperClient(url, token.key, timeout=0.5, retries=3, backoff=0.0)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(RegistryUnavailable, match="the caller gave up"):
        client.request("GET", "runs/", give_up=stop.is_set)
    assert len(accepted) == 1  # the attempt on the wire, and none of the three retries


def test_once_close_gives_up_the_outbox_starts_no_more_sends(silent_server, token):
    url, accepted = silent_server
    client = EsperClient(url, token.key, timeout=0.5, retries=3, backoff=0.0)
    stop = threading.Event()
    with ThreadPoolExecutor(1) as executor:
        outbox = Outbox(client, executor, stop.is_set)
        for i in range(3):  # idempotent writes: each would be tried 4 times
            outbox.put(Write("PATCH", lambda i=i: f"runs/{i}/", {}, f"write {i}"))
        outbox.pump()
        threading.Timer(0.2, stop.set).start()
        drain = outbox.in_flight
        drain.result(timeout=30)
    assert len(accepted) == 1 and len(outbox) == 3  # kept, not sent, not retried


def test_a_loop_with_an_lr_scheduler_grows_a_seed_through_its_whole_lifecycle(make_loop):
    # LambdaLR fails on a param group added after it; seeds join their host's group instead.
    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9995**step)

    loop = make_loop(scheduler=scheduler)
    controller = loop.controller
    loop.run_until(lambda: loop.stage is Stage.TRAINING)
    row = controller.adaptations[0]
    assert loop.in_optimizer(loop.model.seed_parameters("0", 0))
    loop.run_until(lambda: row["final_stage"] is not None)
    assert len(loop.optimizer.param_groups) == 1
    assert loop.scheduler.last_epoch == controller.steps
    assert loop.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9995**controller.steps)


def test_a_loss_spike_rolls_back_and_culls_the_seed_grafted_since_the_snapshot(make_loop):
    # The only snapshot is the one taken at step 0; the seed stays TRAINING until the spike.
    loop = make_loop(snapshot_every=100_000, training_steps=50_000)
    controller = loop.controller
    loop.run_until(lambda: loop.stage is Stage.TRAINING)
    row = controller.adaptations[0]
    seed_params = loop.model.seed_parameters("0", 0)
    assert len(loop.optimizer.param_groups) == 1 and loop.in_optimizer(seed_params)
    assert loop.optimizer.state

    controller.step(1e9)  # one high batch is not a spike: nothing happens yet
    assert loop.stage is Stage.TRAINING and controller.stats()["rollbacks"] == 0
    controller.step(1e9)  # a second in a row is
    assert loop.stage is Stage.CULLED and row["final_stage"] == "CULLED" and row["rolled_back"]
    for restored, initial in zip(loop.model.parameters(), loop.plain.parameters(), strict=True):
        torch.testing.assert_close(restored, initial, rtol=0, atol=0)
    assert loop.only_host_in_optimizer() and not loop.optimizer.state
    x = loop.x_val[:16]
    assert torch.equal(loop.model(x), loop.plain(x))
    assert controller.stats()["rollbacks"] == 1 and controller.history[-1]["rolled_back"]

    loop.run_until(lambda: _rewarded(row["experience"]), timeout=15)
    outcome = _rewarded(row["experience"]).outcome
    assert outcome["rolled_back"] is True and outcome["final_stage"] == "CULLED"
    assert controller.close()


def test_a_rejected_kernel_culls_the_seed_and_reports_a_failed_outcome(make_loop):
    from urza.models import Kernel

    loop = make_loop()
    controller = loop.controller
    loop.run_until(lambda: controller.adaptations)
    row = controller.adaptations[0]
    assert loop.stage is Stage.GERMINATED  # its status is polled from the next step on
    # The registry's fits mask keeps blueprints the compiler refuses out of decisions, so the
    # rejection is written as the worker writes it (tests/tezzeret/test_tasks.py covers the
    # worker rejecting a blueprint for real); the runtime sees only the kernel's status.
    Kernel.objects.filter(pk=row["kernel"]).update(status="rejected", error="test: refused")

    loop.run_until(lambda: row["final_stage"] is not None, timeout=15)
    assert row["final_stage"] == "CULLED" and loop.stage in (Stage.CULLED, Stage.EMBARGOED)
    assert loop.only_host_in_optimizer() and controller.stats()["rejected"] == 1
    loop.run_until(lambda: _rewarded(row["experience"]), timeout=15)
    experience = _rewarded(row["experience"])
    assert experience.outcome["failures"] == 1 and experience.outcome["contribution"] is None
    assert experience.reward < 0
    assert controller.close()


def test_a_seed_the_model_culls_after_failures_is_reported_as_a_failed_outcome(make_loop):
    loop = make_loop(wrap_options={"max_failures": 1}, training_steps=50_000)
    controller = loop.controller
    loop.run_until(lambda: loop.stage is Stage.TRAINING)
    row = controller.adaptations[0]
    with torch.no_grad():
        for p in loop.model.seed_parameters("0", 0):
            p.fill_(float("nan"))  # its output turns non-finite: the model culls it

    loop.run_until(lambda: row["final_stage"] is not None, timeout=10)
    assert row["final_stage"] == "CULLED" and not row["rolled_back"]
    assert loop.only_host_in_optimizer() and controller.stats()["rollbacks"] == 0
    loop.run_until(lambda: _rewarded(row["experience"]), timeout=15)
    outcome = _rewarded(row["experience"]).outcome
    assert outcome["failures"] == 1 and outcome["contribution"] is None


def test_offline_a_non_finite_loss_restores_the_last_snapshot_of_model_and_optimizer():
    loop = Loop(None, snapshot_every=5)
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


def test_only_a_finished_run_reports_a_final_metric_and_a_failing_eval_does_not_stop_close(
    make_loop,
):
    from tamiyo.models import TrainingRun

    def boom() -> float:
        raise RuntimeError("validation data went away")

    failed, broken = make_loop(), make_loop(eval_fn=boom, decide_every=10**6)
    for loop in (failed, broken):
        loop.run_until(lambda loop=loop: loop.controller.run_id)
    assert failed.controller.close(status="failed")
    assert broken.controller.close()  # logs the evaluation error, closes the run all the same
    for loop, status in ((failed, "failed"), (broken, "finished")):
        run = TrainingRun.objects.get(pk=loop.controller.run_id)
        assert run.status == status and "controller" in run.metrics
        assert "final_metric" not in run.metrics


def test_without_eval_fn_the_final_metric_is_the_last_epochs():
    from kasmina import Controller

    loop = Loop(None)
    controller = Controller(loop.model, loop.optimizer, None, total_steps=100)
    controller.epoch_end({"accuracy": 0.5})
    controller.epoch_end({"val_metric": 0.75, "accuracy": 0.5})
    assert controller._final_metric() == 0.75
    assert Controller(loop.model, loop.optimizer, None, total_steps=100)._final_metric() is None


def test_offline_one_unlucky_batch_is_not_a_spike_but_two_in_a_row_are():
    loop = Loop(None, spike_factor=3.0, snapshot_every=5)
    for _ in range(30):
        loop.train_step()
    controller = loop.controller
    ema = controller.history[-1]["loss_ema"]
    controller.step(10 * ema + 1.0)  # one batch far above the EMA, then training goes on
    assert controller.stats()["rollbacks"] == 0
    assert controller.history[-1]["loss_ema"] == ema  # not folded into the EMA either
    loop.train_step()
    controller.step(10 * ema + 1.0)
    controller.step(10 * ema + 1.0)
    assert controller.stats()["rollbacks"] == 1 and controller.history[-1]["rolled_back"]
    assert controller.close()


def test_the_default_budget_is_the_models_own_size_and_a_bad_budget_says_what_to_pass():
    from torch import nn

    from kasmina import Controller, wrap

    model = wrap(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert Controller(model, optimizer, total_steps=10).param_budget == 36 + 15
    assert Controller(model, optimizer, total_steps=10, param_budget=None).param_budget is None
    assert Controller(model, optimizer, total_steps=10, param_budget=7).param_budget == 7
    for bad in (0, -5, 2.5, True, "half"):
        with pytest.raises(ValueError, match=r'^param_budget must be a positive integer, "model"'):
            Controller(model, optimizer, total_steps=10, param_budget=bad)


def test_greedy_asks_the_policy_for_its_most_likely_action_and_bad_values_say_what_to_pass(
    make_loop,
):
    from torch import nn

    from kasmina import Controller, wrap
    from tamiyo.models import Experience

    model = wrap(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="^greedy must be True or False"):
        Controller(model, optimizer, total_steps=10, greedy="yes")
    with pytest.raises(ValueError, match="the random policy has none"):
        Controller(model, optimizer, total_steps=10, policy="random", greedy=True)

    # The heuristic samples at temperature 0.25 over several legal (site, blueprint) pairs,
    # so a sampled germinate has a log-probability below 0; a greedy one is deterministic.
    loop = make_loop(policy="heuristic", greedy=True)
    loop.run_until(lambda: loop.controller.adaptations)
    experience = Experience.objects.get(pk=loop.controller.adaptations[0]["experience"])
    assert experience.action["action"] == "germinate" and experience.policy_name == "heuristic"
    assert experience.behavior_logprob == 0.0


def test_the_loss_trend_is_a_fitted_slope_per_interval_that_noise_does_not_fake():
    import random

    from torch import nn

    from kasmina import Controller, wrap

    def trends_after(losses, decide_every=10):
        model = wrap(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        controller = Controller(model, optimizer, total_steps=1000, decide_every=decide_every)
        trends = []
        for value in losses:
            controller.step(value)
            trends.append(controller._loss_trend())
        return trends, [h["loss_ema"] for h in controller.history]

    # a loss falling 1 % per step falls about 10 % per 10-step decision interval
    falling, _ = trends_after([0.99**t for t in range(200)])
    assert all(t is None for t in falling[:50]) and falling[50] is not None  # 51 EMA values
    assert falling[-1] == pytest.approx(-0.0956, rel=0.05)
    # a flat loss with 10 % minibatch noise: the EMA's change across one interval often
    # exceeds 2 %, the fitted trend stays inside it
    rng = random.Random(0)
    trends, emas = trends_after([1.0 + rng.gauss(0, 0.1) for _ in range(400)])
    changes = [abs(b - a) / a for a, b in zip(emas[50:-10], emas[60:], strict=True)]
    assert sum(c > 0.02 for c in changes) > len(changes) / 4
    assert max(abs(t) for t in trends[50:]) < 0.02
    # a long decision interval fits over that interval
    assert trends_after([1.0] * 101, decide_every=100)[0][-2:] == [None, 0.0]
