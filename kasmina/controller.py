"""`Controller`: Tamiyo's decisions and the seed lifecycle, plugged into any training loop.

```
for x, y in batches:
    optimizer.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); optimizer.step()
    controller.step(loss)
controller.close()
```

`step()` never waits on the network. Requests run on one background thread and their
answers are picked up on later steps: decisions every `decide_every` steps, kernel status
polls while a kernel compiles. Every write (opening the run, outcomes, run metrics) goes
through an ordered outbox that retries with backoff while the server is unreachable, so
training goes on and the records land once the server is back.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field

import torch

from kasmina._model import MorphableModel, optimizer_add, optimizer_remove
from kasmina._outbox import Outbox, Write
from kasmina._snapshot import Snapshot
from kasmina.client import EsperClient
from kasmina.lifecycle import GRAFTED_STAGES, Stage

__all__ = ["Controller"]

logger = logging.getLogger(__name__)

EMA_BETA = 0.9
MAX_ROLLBACKS_IN_A_ROW = 3
NOISE_DEVIATIONS = 8.0  # a spike is also this many mean absolute deviations above the EMA
TREND_STEPS = 50  # the loss trend is fitted over at least this many steps of the loss EMA
DEFAULT_TELEMETRY_EVERY = 10  # health sampling when neither wrap() nor Controller sets it
COUNTED = ("decisions", "waits", "germinated", "fossilized", "culled", "rejected", "rollbacks")
_GONE = frozenset({Stage.CULLED, Stage.EMBARGOED, Stage.DORMANT})
_BEFORE_TRAINING = frozenset({Stage.GERMINATED, Stage.LOADING, Stage.ERROR_RECOVERY})
_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


@dataclass
class _Asked:
    """What the runtime knew when it asked for a decision."""

    step: int
    at: float
    metric: float
    loss: float


@dataclass
class _Adaptation:
    """A germinate decision being carried out on one seed."""

    experience: str | None  # None: a seed the Controller adopted (no decision to report to)
    layer: str
    seed: int
    kernel: str
    asked: _Asked
    row: dict
    errors_at_start: int = 0
    stage: Stage = Stage.GERMINATED
    stage_step: int = 0
    params: list = field(default_factory=list)
    poll: Future | None = None
    next_poll: float = 0.0


def _answer(future: Future, what: str):
    """A finished request's answer, or None when it failed (training never sees the error)."""
    try:
        return future.result()
    except CancelledError:
        return None
    except Exception as exc:  # noqa: BLE001 - any failure of a request is logged, not raised
        logger.warning("%s failed: %s", what, exc, extra={"what": what, "error": str(exc)})
        return None


def _row(experience, step, layer, seed, kernel, blueprint=None, policy=None) -> dict:
    """One entry of `Controller.adaptations`: a decision's seed, filled in as it goes."""
    return {
        "experience": experience,
        "step": step,
        "layer": layer,
        "seed": seed,
        "blueprint": blueprint,
        "kernel": kernel,
        "policy": policy,
        "final_stage": None,
        "contribution": None,
        "params_added": 0,
        "rolled_back": False,
        "decision_to_training_s": None,
        "decision_to_training_steps": None,
        "finished_step": None,
    }


def _plain(value):
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


class Controller:
    """Grows `model` while it trains: asks Tamiyo where to grow, runs each seed's lifecycle,
    adds new parameters to `optimizer`, reports outcomes, and rolls back loss spikes.

    Every `decide_every` steps it asks `/decisions/` (while a whole lifecycle still fits in
    `total_steps`). A granted kernel is polled every `poll_interval` s until validated, then
    loaded; the seed trains for `training_steps`, blends over `model.blend_steps`, and after
    `probation_steps` is kept (FOSSILIZED) if its counterfactual contribution is positive.
    A loss that is non-finite, or above `spike_factor` × its EMA (after `warmup_steps`)
    and far outside its usual noise, restores the snapshot taken every `snapshot_every`
    good steps. `client=None` runs offline: no decisions; snapshots and rollback still work.
    `eval_fn()` returns a higher-is-better metric on held-out data (run under `no_grad`
    with the model in eval mode); without it the metric is the negative training-loss EMA
    and contributions are not measured (a seed is kept if the loss did not get worse).
    `param_budget` bounds the parameters growth may add: the server offers only kernels
    that fit what is left of it. The default "model" is the model's own parameter count
    (growth at most doubles it); None means no limit beyond the compiler's. `policy` names
    a server policy ("gnn", "heuristic", "random"; None: the server's active one), and
    `greedy=True` asks it for its most likely action instead of a sample: no exploration,
    for a run that wants the policy's best guess rather than experiences to learn from.
    `telemetry_every` sets how often per-layer health (what the policy reads) is sampled:
    by default the model's own setting, or every 10 steps when the model samples none.
    Seeds the Controller did not start (a resumed checkpoint's) go on through their
    lifecycle and are judged, with no outcome to report.
    """

    def __init__(
        self,
        model: MorphableModel,
        optimizer: torch.optim.Optimizer,
        client: EsperClient | None = None,
        *,
        run_name: str = "run",
        total_steps: int,
        decide_every: int = 100,
        probation_steps: int = 50,
        training_steps: int = 50,
        eval_fn: Callable[[], float] | None = None,
        param_budget: int | str | None = "model",
        policy: str | None = None,
        greedy: bool = False,
        spike_factor: float = 3.0,
        snapshot_every: int = 50,
        warmup_steps: int = 20,
        poll_interval: float = 0.5,
        telemetry_every: int | None = None,
    ) -> None:
        if not isinstance(model, MorphableModel):
            raise TypeError("Controller needs a MorphableModel: pass kasmina.wrap(model, ...)")
        if client is not None and model.loader is None:
            raise ValueError(
                "the model has no kernel loader, so granted kernels could not be loaded: "
                "wrap(model, client=client)"
            )
        for name, value in (
            ("total_steps", total_steps),
            ("decide_every", decide_every),
            ("snapshot_every", snapshot_every),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if probation_steps < 0 or training_steps < 0 or warmup_steps < 0:
            raise ValueError("probation_steps, training_steps and warmup_steps must be >= 0")
        if not isinstance(greedy, bool):
            raise ValueError(f"greedy must be True or False, got {greedy!r}")
        if greedy and policy == "random":
            raise ValueError(
                "greedy=True asks for the policy's most likely action, and the random policy "
                'has none: use policy="random" without greedy, or another policy'
            )
        if spike_factor <= 1.0:
            raise ValueError(f"spike_factor must be above 1, got {spike_factor}")
        if telemetry_every is not None and (
            isinstance(telemetry_every, bool)
            or not isinstance(telemetry_every, int)
            or telemetry_every < 1
        ):
            raise ValueError(f"telemetry_every must be a positive integer, got {telemetry_every!r}")
        if param_budget == "model":  # the model's own parameters, not seeds it already has
            param_budget = sum(p.numel() for p in model.parameters()) - sum(
                p.numel() for p in model.seed_parameters()
            )
        if param_budget is not None and (
            isinstance(param_budget, bool) or not isinstance(param_budget, int) or param_budget <= 0
        ):
            raise ValueError(
                'param_budget must be a positive integer, "model" (the default: as many '
                f"parameters as the model has) or None (no limit), got {param_budget!r}"
            )
        self.model, self.optimizer, self.client = model, optimizer, client
        self.total_steps, self.decide_every = int(total_steps), int(decide_every)
        self.probation_steps, self.training_steps = int(probation_steps), int(training_steps)
        self.eval_fn, self.param_budget, self.policy = eval_fn, param_budget, policy
        self.greedy = greedy
        self.spike_factor, self.snapshot_every = float(spike_factor), int(snapshot_every)
        self.warmup_steps, self.poll_interval = int(warmup_steps), float(poll_interval)
        if telemetry_every is not None:
            model.telemetry_every = telemetry_every
        elif not model.telemetry_every:  # the policy reads per-layer health: sample it
            model.telemetry_every = DEFAULT_TELEMETRY_EVERY
        model.attach_optimizer(optimizer)
        self.steps = 0
        self.epoch = 0
        self.run_id: str | None = None
        self.history: list[dict] = []
        self.adaptations: list[dict] = []
        self._counts: Counter[str] = Counter()
        self._active: dict[tuple[str, int], _Adaptation] = {}
        self._fossils: dict[tuple[str, int], list] = {}
        self._waits: list[tuple[str, _Asked]] = []
        self._ema: float | None = None
        self._dev = 0.0
        self._emas: deque[float] = deque(maxlen=max(self.decide_every, TREND_STEPS) + 1)
        self._good = self._since_snapshot = self._in_a_row = 0
        self._high = False  # the last step's loss was high (a second one in a row is a spike)
        self._metrics: deque[float] = deque(maxlen=2)  # the last two validation metrics
        self._metric_now: tuple[int, float] | None = None
        self._asked: tuple[Future, _Asked] | None = None
        self._closed = False
        # One background thread for every request: decisions, polls and the outbox's writes.
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="esper-controller") if client else None
        )
        # Set once close() stops waiting: requests still queued or retrying give up, so a
        # hung server cannot hold the process open at exit for every retry.
        self._stopping = threading.Event()
        self._outbox = Outbox(client, self._executor, self._stopping.is_set) if client else None
        self._generation = -1
        self._adopt()
        self._snapshot = self._take_snapshot()
        if client is not None:
            layers = [
                {"name": n, "type": type(la.host).__name__, **la.signature, "seeds": la.num_seeds}
                for n, la in model.seed_layers.items()
            ]
            config = {
                "param_budget": param_budget,
                "decide_every": self.decide_every,
                "total_steps": self.total_steps,
                "training_steps": self.training_steps,
                "blend_steps": model.blend_steps,
                "probation_steps": self.probation_steps,
                "policy": policy,
                "greedy": greedy,
                "spike_factor": self.spike_factor,
                "snapshot_every": self.snapshot_every,
            }
            summary = {"params": sum(p.numel() for p in model.parameters()), "layers": layers}
            self._enqueue(
                "POST",
                lambda: "runs/",
                {"name": run_name, "model_summary": summary, "config": config},
                "open run",
                idempotent=False,
                on_done=self._run_opened,
            )
            self._pump()

    # -- the training loop's calls -------------------------------------------------------
    def step(self, loss: torch.Tensor | float) -> None:
        """One training step done (call it after `optimizer.step()`); never waits on the network."""
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    "controller.step(loss) takes the batch's scalar loss; got a tensor of shape "
                    f"{tuple(loss.shape)} (reduce it first, e.g. loss.mean())"
                )
            value = float(loss.detach())
        else:
            value = float(loss)
        self.steps += 1
        self.model.step()
        verdict = self._verdict(value)
        spike = verdict == "spike"
        if spike:
            self._rollback(value)
        elif verdict == "ok":
            self._observe(value)
        self.history.append(
            {"step": self.steps, "loss": value, "loss_ema": self._ema, "rolled_back": spike}
        )
        if self.model.generation != self._generation:  # a checkpoint was loaded
            self._adopt()
        self._collect()
        self._track()
        self._finish_waits()
        if self._decision_due():
            self._ask()
        self._poll_kernels()
        self._pump()
        if verdict == "ok" and self._since_snapshot >= self.snapshot_every:
            self._snapshot = self._take_snapshot()

    def epoch_end(self, metrics: Mapping) -> None:
        """Send the epoch's metrics to the run. Without `eval_fn`, its 'val_metric' (or
        'accuracy') is the validation metric the policy sees; with it, `eval_fn` is."""
        self.epoch += 1
        value = metrics.get("val_metric", metrics.get("accuracy"))
        if self.eval_fn is None and value is not None and math.isfinite(float(value)):
            self._metrics.append(float(value))
        if self.client is not None:
            body = {"epoch": self.epoch, **{str(k): _plain(v) for k, v in metrics.items()}}
            self._patch_run({"metrics": body}, "epoch metrics")
            self._pump()

    def close(self, status: str = "finished", timeout: float = 10.0) -> bool:
        """Mark the run `status`, send what the outbox holds (up to `timeout` s), stop the thread.

        A finished run also reports its final validation metric (run metrics
        ``final_metric``: `eval_fn` on the model as it stands, or without one the last
        epoch's metric), which policy training credits to the run's growth decisions.
        Returns whether every write reached the server and was accepted: False when one is
        still unsent or the server refused one (with a bad token the run is never opened).
        Seeds still mid-lifecycle are left unreported (their outcome was never measured).
        """
        if self._closed:
            return self._outbox is None or (not self._outbox and not self._outbox.dropped)
        self._closed = True
        if self._outbox is None:
            return True
        metrics = {"controller": self.stats()}
        final = self._final_metric() if status == "finished" else None
        if final is not None:
            metrics["final_metric"] = final
        self._patch_run({"status": status, "metrics": metrics}, "close run")
        reads = [a.poll for a in self._active.values()] + [self._asked and self._asked[0]]
        reads = [future for future in reads if future is not None]
        for future in reads:
            future.cancel()
        deadline = time.monotonic() + timeout
        sent = self._outbox.flush(deadline)
        self._executor.shutdown(wait=False, cancel_futures=True)
        # A request already on the wire may finish (within the deadline), not outlive close().
        running = [f for f in (*reads, self._outbox.in_flight) if f is not None]
        wait_futures(running, timeout=max(0.0, deadline - time.monotonic()))
        self._stopping.set()
        if not sent:
            logger.warning(
                "%d writes not sent before close",
                len(self._outbox),
                extra={"unsent": len(self._outbox)},
            )
        return sent and not self._outbox.dropped

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self.close("failed" if exc_type is not None else "finished")

    def stats(self) -> dict:
        """Counts, parameters added and the median decision → TRAINING cycle time."""
        seconds = [r["decision_to_training_s"] for r in self.adaptations]
        steps = [r["decision_to_training_steps"] for r in self.adaptations]
        seconds = [s for s in seconds if s is not None]
        steps = [s for s in steps if s is not None]
        return {
            "steps": self.steps,
            "run": self.run_id,
            **{key: self._counts[key] for key in COUNTED},
            "in_flight": len(self._active),
            "params_added": sum(
                r["params_added"] for r in self.adaptations if r["final_stage"] == "FOSSILIZED"
            ),
            "median_decision_to_training_s": statistics.median(seconds) if seconds else None,
            "median_decision_to_training_steps": statistics.median(steps) if steps else None,
            "pending_writes": len(self._outbox) if self._outbox is not None else 0,
        }

    # -- loss tracking, snapshots and rollback -------------------------------------------
    def _verdict(self, value: float) -> str:
        """'spike' (roll back), 'high' (one high batch: not folded into the EMA) or 'ok'.

        A non-finite loss is a spike at once. A finite one is a spike when it is beyond
        spike_factor × EMA and far outside the usual batch-to-batch noise on two steps in a
        row: at a low loss one unlucky minibatch easily exceeds a multiple of the EMA.
        """
        if not math.isfinite(value):
            return "spike"
        if self._ema is None or self._good < self.warmup_steps:
            return "ok"
        margin = max((self.spike_factor - 1.0) * abs(self._ema), NOISE_DEVIATIONS * self._dev)
        if value - self._ema <= margin:
            self._high = False
            return "ok"
        if not self._high:
            self._high = True
            return "high"
        if self._in_a_row >= MAX_ROLLBACKS_IN_A_ROW:
            logger.warning(
                "loss stays high (%.4g) after %d rollbacks in a row; accepting it",
                value,
                self._in_a_row,
                extra={"loss": value},
            )
            self._ema, self._high = value, False
            return "ok"
        return "spike"

    def _observe(self, value: float) -> None:
        if self._ema is None:
            self._ema, self._dev = value, 0.0
        else:
            self._dev = EMA_BETA * self._dev + (1 - EMA_BETA) * abs(value - self._ema)
            self._ema = EMA_BETA * self._ema + (1 - EMA_BETA) * value
        self._emas.append(self._ema)
        self._good += 1
        self._since_snapshot += 1
        self._in_a_row = 0

    def _take_snapshot(self) -> Snapshot:
        self._since_snapshot = 0
        return Snapshot.take(
            self.model, self.optimizer, self.steps, ema=self._ema, dev=self._dev, good=self._good
        )

    def _rollback(self, value: float) -> None:
        """Back to the last snapshot; seeds grafted since it are culled (they are new there)."""
        snap = self._snapshot
        self._counts["rollbacks"] += 1
        self._in_a_row += 1
        self._high = False
        culled: list[_Adaptation] = []
        for name, layer in self.model.seed_layers.items():
            for idx in range(layer.num_seeds):
                if layer.stages[idx] not in GRAFTED_STAGES:
                    continue
                if snap.holds(self.model.seed_parameters(name, idx)):
                    continue
                self.model.unload_kernel(
                    name,
                    idx,
                    optimizer=self.optimizer,
                    reason="rolled back: newer than the snapshot",
                )
                self._fossils.pop((name, idx), None)
                adaptation = self._active.get((name, idx))
                if adaptation is not None:
                    adaptation.params = []
                    culled.append(adaptation)
        snap.restore(self.optimizer)
        self._ema, self._dev, self._good = (snap.extra[k] for k in ("ema", "dev", "good"))
        self._emas.clear()
        self._since_snapshot = 0
        self._metric_now = None
        logger.warning(
            "loss spike at step %d (loss %.4g, EMA %.4g): rolled back to step %d%s",
            self.steps,
            value,
            self._ema if self._ema is not None else float("nan"),
            snap.step,
            f"; culled {', '.join(f'{a.layer}[{a.seed}]' for a in culled)}" if culled else "",
            extra={
                "step": self.steps,
                "loss": value,
                "loss_ema": self._ema,
                "snapshot_step": snap.step,
                "culled": [f"{a.layer}[{a.seed}]" for a in culled],
            },
        )
        for adaptation in culled:
            self._finish(adaptation, Stage.CULLED, rolled_back=True)

    # -- metrics -------------------------------------------------------------------------
    def _evaluate(self) -> float:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return float(self.eval_fn())
        finally:
            self.model.train(was_training)

    def _final_metric(self) -> float | None:
        if self.eval_fn is not None:
            try:
                value = self._evaluate()
            except Exception:  # close() often runs in a `finally`: never raise from it
                logger.exception("final evaluation failed; the run closes without final_metric")
                return None
        else:
            value = self._metrics[-1] if self._metrics else None
        return value if value is not None and math.isfinite(value) else None

    def _metric(self) -> float:
        """This step's metric (eval_fn, or the negative loss EMA), evaluated once per step."""
        if self._metric_now is not None and self._metric_now[0] == self.steps:
            return self._metric_now[1]
        if self.eval_fn is not None:
            value = self._evaluate()
            self._metrics.append(value)
        else:
            value = -(self._ema if self._ema is not None else 0.0)
        self._metric_now = (self.steps, value)
        return value

    # -- decisions -----------------------------------------------------------------------
    def _decision_due(self) -> bool:
        remaining = self.total_steps - self.steps
        return (
            self._executor is not None
            and not self._closed
            and self.run_id is not None
            and self._asked is None
            and not self._outbox.server_down  # ask again once writes get through
            # A kernel not yet grafted has no parameters to count in budget_used: with a
            # budget, wait until it is, so the policy never sees the budget as emptier.
            and not (
                self.param_budget
                and any(a.stage in _BEFORE_TRAINING for a in self._active.values())
            )
            and self._ema is not None
            and self.steps % self.decide_every == 0
            and remaining >= self.training_steps + self.model.blend_steps + self.probation_steps
        )

    def _loss_trend(self) -> float | None:
        """Relative change of the loss EMA per decision interval: the least-squares slope over
        the last ``max(decide_every, TREND_STEPS)`` steps, times ``decide_every``, over the
        window's mean. None until the window is full. (The change across one short interval
        is mostly minibatch noise; a plateau test on it fires at random.)"""
        window = self._emas
        n = len(window)
        if n < window.maxlen:
            return None
        mean_x, mean_y = (n - 1) / 2, sum(window) / n
        sxy = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(window))
        sxx = n * (n * n - 1) / 12
        return sxy / sxx * self.decide_every / max(abs(mean_y), 1e-12)

    def _ask(self) -> None:
        asked = _Asked(self.steps, time.monotonic(), self._metric(), self._ema)
        loss_trend = self._loss_trend()
        grown = sum(p.numel() for p in self.model.seed_parameters())
        doc = self.model.graph_document(
            progress=min(1.0, self.steps / self.total_steps),
            loss=self._ema,
            loss_trend=loss_trend,
            val_metric=self._metrics[-1] if self._metrics else None,
            val_trend=self._metrics[-1] - self._metrics[-2] if len(self._metrics) > 1 else None,
            budget_used=grown / self.param_budget if self.param_budget else 0.0,
        )
        weight = next(self.model.parameters(), None)
        body = {
            "graph": doc,
            "dtype": _DTYPES.get(weight.dtype, "float32") if weight is not None else "float32",
            "epoch": self.epoch,
        }
        if self.policy is not None:
            body["policy"] = self.policy
        if self.greedy:  # sent only when set: servers without the field accept the rest
            body["greedy"] = True
        future = self._executor.submit(
            self.client.request,
            "POST",
            f"runs/{self.run_id}/decisions/",
            body,
            give_up=self._stopping.is_set,
        )
        self._asked = (future, asked)

    def _collect(self) -> None:
        """Pick up answers that arrived since the last step."""
        if self._asked is not None and self._asked[0].done():
            future, asked = self._asked
            self._asked = None
            answer = _answer(future, "decision request")
            if answer is not None:
                self._decided(answer, asked)
        for adaptation in list(self._active.values()):
            future = adaptation.poll
            if future is None or not future.done():
                continue
            adaptation.poll = None
            info = _answer(future, "kernel status poll")
            if info is not None:
                self._kernel_status(adaptation, info.status, info.error)

    def _decided(self, answer: dict, asked: _Asked) -> None:
        self._counts["decisions"] += 1
        experience = str(answer["experience"])
        if answer["action"] != "germinate":
            self._counts["waits"] += 1
            self._waits.append((experience, asked))
            return
        layer_name, seed, kernel = answer.get("layer"), answer.get("seed"), answer.get("kernel")
        row = _row(
            experience,
            asked.step,
            layer_name,
            seed,
            kernel,
            answer.get("blueprint"),
            answer.get("policy"),
        )
        self.adaptations.append(row)
        adaptation = _Adaptation(experience, layer_name, seed, str(kernel), asked, row)
        try:
            layer = self.model.layer(layer_name)
            adaptation.errors_at_start = layer.error_counts[layer.check_index(seed)]
            if kernel is None:
                raise ValueError("the decision granted no kernel")
            self.model.germinate(layer_name, seed, str(kernel))
        except ValueError as exc:
            logger.warning("germinate decision not applicable: %s", exc, extra={"error": str(exc)})
            self._finish(adaptation, Stage.CULLED, failures=1, tracked=False)
            return
        self._counts["germinated"] += 1
        adaptation.stage_step = self.steps
        self._active[(layer_name, seed)] = adaptation

    def _poll_kernels(self) -> None:
        now = time.monotonic()
        for adaptation in self._active.values():
            if (
                adaptation.stage is Stage.GERMINATED
                and adaptation.poll is None
                and self.steps > adaptation.stage_step
                and now >= adaptation.next_poll
                and self._executor is not None
                and not self._closed
            ):
                adaptation.next_poll = now + self.poll_interval
                adaptation.poll = self._executor.submit(
                    self.client.get_kernel, adaptation.kernel, give_up=self._stopping.is_set
                )

    def _kernel_status(self, adaptation: _Adaptation, status: str, error: str) -> None:
        layer = self.model.layer(adaptation.layer)
        if layer.stages[adaptation.seed] is not Stage.GERMINATED:
            return
        if status == "validated":
            self.model.begin_load(adaptation.layer, adaptation.seed)
        elif status in ("rejected", "retired"):
            self._counts["rejected"] += 1
            reason = f"kernel {status}: {error or 'no reason given'}"
            self.model.advance(adaptation.layer, adaptation.seed, Stage.CULLED, reason)
            self._finish(adaptation, Stage.CULLED, failures=1)

    # -- lifecycles ----------------------------------------------------------------------
    def _adopt(self) -> None:
        """Take on the model's seeds as they stand: at the start, and after each checkpoint
        load (`model.generation`). A seed mid-lifecycle that no decision of this Controller
        started (a resumed run's) goes on through its lifecycle and is judged, but has no
        experience to report to. Seed parameters are re-read, as a load may replace them,
        and join the optimizer."""
        self._generation = self.model.generation
        for name, layer in self.model.seed_layers.items():
            for idx, stage in enumerate(layer.stages):
                key = (name, idx)
                if stage is Stage.FOSSILIZED:
                    self._fossils[key] = self.model.seed_parameters(name, idx)
                    optimizer_add(self.optimizer, self._fossils[key], layer)
                    continue
                if stage not in GRAFTED_STAGES and stage not in _BEFORE_TRAINING:
                    continue
                adaptation = self._active.get(key)
                if adaptation is None:
                    asked = _Asked(self.steps, time.monotonic(), math.nan, math.inf)
                    row = _row(None, self.steps, name, idx, layer.kernel_ids[idx], policy="adopted")
                    adaptation = _Adaptation(
                        None, name, idx, str(layer.kernel_ids[idx]), asked, row
                    )
                    adaptation.stage, adaptation.stage_step = stage, self.steps
                    adaptation.errors_at_start = layer.error_counts[idx]
                    self._active[key] = adaptation
                    logger.info(
                        "seed %s[%d] adopted in %s",
                        name,
                        idx,
                        stage.name,
                        extra={"layer": name, "seed": idx, "stage": stage.name},
                    )
                if stage in GRAFTED_STAGES:
                    adaptation.params = self.model.seed_parameters(name, idx)
                    optimizer_add(self.optimizer, adaptation.params, layer)

    def _track(self) -> None:
        """Follow each seed's stage: new parameters into the optimizer, timed moves, judging."""
        for key, params in list(self._fossils.items()):
            if self.model.layer(key[0]).stages[key[1]] is not Stage.FOSSILIZED:
                optimizer_remove(self.optimizer, params)
                del self._fossils[key]
        for adaptation in list(self._active.values()):
            stage = self.model.layer(adaptation.layer).stages[adaptation.seed]
            if stage is not adaptation.stage:
                self._entered(adaptation, stage)
                if stage in _GONE:
                    continue
            in_stage = self.steps - adaptation.stage_step
            if stage is Stage.TRAINING and in_stage >= self.training_steps:
                self.model.advance(adaptation.layer, adaptation.seed, Stage.BLENDING, "trained")
                adaptation.stage, adaptation.stage_step = Stage.BLENDING, self.steps
            elif stage is Stage.PROBATION and in_stage >= self.probation_steps:
                self._judge(adaptation)

    def _entered(self, adaptation: _Adaptation, stage: Stage) -> None:
        adaptation.stage, adaptation.stage_step = stage, self.steps
        if adaptation.params and stage not in GRAFTED_STAGES:
            optimizer_remove(self.optimizer, adaptation.params)  # the module is gone
            adaptation.params = []
        if stage is Stage.TRAINING and not adaptation.params:
            adaptation.params = self.model.seed_parameters(adaptation.layer, adaptation.seed)
            optimizer_add(self.optimizer, adaptation.params, self.model.layer(adaptation.layer))
            row = adaptation.row
            if row["decision_to_training_s"] is None:
                row["decision_to_training_s"] = time.monotonic() - adaptation.asked.at
                row["decision_to_training_steps"] = self.steps - adaptation.asked.step
        elif stage in _GONE:
            self._finish(adaptation, Stage.CULLED)  # the model culled it (repeated failures)

    def _judge(self, adaptation: _Adaptation) -> None:
        """End of probation: keep the seed if the metric is better with it than without."""
        name, idx = adaptation.layer, adaptation.seed
        self._metric_now = None
        if self.eval_fn is not None:
            layer = self.model.layer(name)
            alpha = layer.alphas[idx]
            with_seed = self._evaluate()
            layer.set_alpha(idx, 0.0)
            try:
                without = self._evaluate()
            finally:
                layer.set_alpha(idx, alpha)
            contribution = with_seed - without
            keep = contribution > 0
            after = with_seed if keep else without
        else:
            contribution = None
            keep = self._ema <= adaptation.asked.loss
            after = -self._ema
        params = sum(p.numel() for p in adaptation.params)
        if keep:
            self.model.advance(name, idx, Stage.FOSSILIZED, "contribution > 0")
            self._fossils[(name, idx)] = adaptation.params
            self._finish(
                adaptation,
                Stage.FOSSILIZED,
                contribution=contribution,
                metric_after=after,
                params_added=params,
            )
        else:
            reason = "the loss got worse" if contribution is None else "contribution <= 0"
            self.model.unload_kernel(name, idx, optimizer=self.optimizer, reason=reason)
            adaptation.params = []
            self._finish(adaptation, Stage.CULLED, contribution=contribution, metric_after=after)

    def _finish(
        self,
        adaptation: _Adaptation,
        final: Stage,
        *,
        contribution: float | None = None,
        metric_after: float | None = None,
        params_added: int = 0,
        failures: int = 0,
        rolled_back: bool = False,
        tracked: bool = True,
    ) -> None:
        """Close an adaptation and queue its outcome report."""
        if tracked:
            self._active.pop((adaptation.layer, adaptation.seed), None)
            layer = self.model.layer(adaptation.layer)
            failures += max(0, layer.error_counts[adaptation.seed] - adaptation.errors_at_start)
        if adaptation.poll is not None:
            adaptation.poll.cancel()
        self._metric_now = None
        self._counts[final.name.lower()] += 1
        adaptation.row.update(
            final_stage=final.name,
            contribution=contribution,
            params_added=params_added,
            rolled_back=rolled_back,
            finished_step=self.steps,
        )
        if adaptation.experience is None:  # adopted: no decision to report to
            return
        if metric_after is None:
            metric_after = self._metric()
        outcome = {
            "final_stage": final.name,
            "contribution": contribution,
            "metric_before": adaptation.asked.metric,
            "metric_after": metric_after,
            "params_added": params_added,
            "failures": failures,
            "rolled_back": rolled_back,
        }
        self._report(adaptation.experience, outcome)

    def _finish_waits(self) -> None:
        due = [w for w in self._waits if self.steps - w[1].step >= self.decide_every]
        if not due:
            return
        self._waits = [w for w in self._waits if self.steps - w[1].step < self.decide_every]
        for experience, asked in due:
            self._report(
                experience, {"metric_before": asked.metric, "metric_after": self._metric()}
            )

    # -- the outbox ----------------------------------------------------------------------
    def _run_opened(self, body: dict) -> None:
        self.run_id = str(body["id"])
        logger.info("training run opened", extra={"run": self.run_id})

    def _report(self, experience: str, outcome: dict) -> None:
        self._enqueue(
            "PATCH", lambda: f"experiences/{experience}/", {"outcome": outcome}, "outcome"
        )

    def _patch_run(self, body: dict, what: str) -> None:
        self._enqueue("PATCH", lambda: f"runs/{self.run_id}/" if self.run_id else None, body, what)

    def _enqueue(self, method: str, path, body: dict, what: str, **options) -> None:
        if self._outbox is not None:
            self._outbox.put(Write(method, path, body, what, **options))

    def _pump(self) -> None:
        if self._outbox is not None and not self._closed:
            self._outbox.pump()
