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

import copy
import itertools
import logging
import math
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field

import torch

from kasmina._model import MorphableModel, _optimizer_remove
from kasmina.client import EsperClient
from kasmina.errors import KasminaError, RegistryUnavailable
from kasmina.lifecycle import GRAFTED_STAGES, Stage

__all__ = ["Controller"]

logger = logging.getLogger(__name__)

EMA_BETA = 0.9
RETRY_BASE_S, RETRY_MAX_S = 0.5, 30.0
MAX_ROLLBACKS_IN_A_ROW = 3
_GONE = frozenset({Stage.CULLED, Stage.EMBARGOED, Stage.DORMANT})
_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


@dataclass
class _Write:
    """One outbox entry; `path` is resolved when it is sent (the run id may come later)."""

    method: str
    path: Callable[[], str | None]
    body: dict
    what: str
    idempotent: bool = True
    on_done: Callable[[dict], None] | None = None


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

    experience: str
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


@dataclass
class _Snapshot:
    """Parameters, buffers and optimizer state by tensor identity (safe across grafts)."""

    step: int
    tensors: dict[int, tuple[torch.Tensor, torch.Tensor]]
    optim: dict[int, dict]
    ema: float | None
    good: int


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

    `client=None` runs offline: no decisions, but snapshots and rollback still work.
    `eval_fn()` returns a higher-is-better metric on held-out data (run under `no_grad`
    with the model in eval mode); without it the metric is the negative training-loss EMA
    and contributions are not measured (a seed is kept if the loss did not get worse).
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
        param_budget: int | None = None,
        policy: str | None = None,
        spike_factor: float = 3.0,
        snapshot_every: int = 50,
        warmup_steps: int = 20,
        poll_interval: float = 0.5,
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
        if spike_factor <= 1.0:
            raise ValueError(f"spike_factor must be above 1, got {spike_factor}")
        if param_budget is not None and param_budget <= 0:
            raise ValueError(f"param_budget must be a positive integer or None, got {param_budget}")
        self.model, self.optimizer, self.client = model, optimizer, client
        self.total_steps, self.decide_every = int(total_steps), int(decide_every)
        self.probation_steps, self.training_steps = int(probation_steps), int(training_steps)
        self.eval_fn, self.param_budget, self.policy = eval_fn, param_budget, policy
        self.spike_factor, self.snapshot_every = float(spike_factor), int(snapshot_every)
        self.warmup_steps, self.poll_interval = int(warmup_steps), float(poll_interval)
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
        self._emas: deque[float] = deque(maxlen=self.decide_every + 1)
        self._good = self._since_snapshot = self._in_a_row = 0
        self._metrics: list[float] = []
        self._metric_now: tuple[int, float] | None = None
        self._asked: tuple[Future, _Asked] | None = None
        self._outbox: deque[_Write] = deque()
        self._lock = threading.Lock()
        self._drain: Future | None = None
        self._retry_at, self._write_failures = 0.0, 0
        self._closed = False
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="esper-controller") if client else None
        )
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
        self.steps += 1
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        self.model.step()
        spike = self._is_spike(value)
        if spike:
            self._rollback(value)
        else:
            self._observe(value)
        self.history.append(
            {"step": self.steps, "loss": value, "loss_ema": self._ema, "rolled_back": spike}
        )
        self._collect()
        self._track()
        self._finish_waits()
        if self._decision_due():
            self._ask()
        self._poll_kernels()
        self._pump()
        if not spike and self._since_snapshot >= self.snapshot_every:
            self._snapshot = self._take_snapshot()

    def epoch_end(self, metrics: Mapping) -> None:
        """Record the epoch's validation metric ('val_metric' or 'accuracy') and send metrics."""
        self.epoch += 1
        value = metrics.get("val_metric", metrics.get("accuracy"))
        if value is not None and math.isfinite(float(value)):
            self._metrics.append(float(value))
        if self.client is not None:
            body = {"epoch": self.epoch, **{str(k): _plain(v) for k, v in metrics.items()}}
            self._patch_run({"metrics": body}, "epoch metrics")
            self._pump()

    def close(self, status: str = "finished", timeout: float = 10.0) -> bool:
        """Mark the run `status`, send what the outbox holds (up to `timeout` s), stop the thread.

        Returns whether every write reached the server. Seeds still mid-lifecycle are left
        unreported (their outcome was never measured).
        """
        if self._closed:
            return not self._outbox
        self._closed = True
        if self._executor is None:
            return True
        self._patch_run({"status": status, "metrics": {"controller": self.stats()}}, "close run")
        for future in [a.poll for a in self._active.values()] + [self._asked and self._asked[0]]:
            if future is not None:
                future.cancel()
        self._retry_at = 0.0
        deadline = time.monotonic() + timeout
        while self._outbox and (remaining := deadline - time.monotonic()) > 0:
            if self._drain is None or self._drain.done():
                backoff = self._retry_at - time.monotonic()
                if backoff > 0:
                    time.sleep(min(backoff, remaining))
                    continue
                self._drain = self._executor.submit(self._drain_outbox)
            wait_futures([self._drain], timeout=remaining)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._outbox:
            logger.warning("writes not sent before close", extra={"unsent": len(self._outbox)})
        return not self._outbox

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
            **{
                key: self._counts[key]
                for key in (
                    "decisions",
                    "waits",
                    "germinated",
                    "fossilized",
                    "culled",
                    "rejected",
                    "rollbacks",
                )
            },
            "in_flight": len(self._active),
            "params_added": sum(
                r["params_added"] for r in self.adaptations if r["final_stage"] == "FOSSILIZED"
            ),
            "median_decision_to_training_s": statistics.median(seconds) if seconds else None,
            "median_decision_to_training_steps": statistics.median(steps) if steps else None,
            "pending_writes": len(self._outbox),
        }

    # -- loss tracking, snapshots and rollback -------------------------------------------
    def _is_spike(self, value: float) -> bool:
        if not math.isfinite(value):
            return True
        if self._ema is None or self._good < self.warmup_steps:
            return False
        if value - self._ema <= (self.spike_factor - 1.0) * abs(self._ema):
            return False
        if self._in_a_row >= MAX_ROLLBACKS_IN_A_ROW:
            logger.warning("loss stays high after rollbacks; accepting it", extra={"loss": value})
            self._ema = value
            return False
        return True

    def _observe(self, value: float) -> None:
        self._ema = value if self._ema is None else EMA_BETA * self._ema + (1 - EMA_BETA) * value
        self._emas.append(self._ema)
        self._good += 1
        self._since_snapshot += 1
        self._in_a_row = 0

    def _take_snapshot(self) -> _Snapshot:
        bookkeeping = {
            id(b) for layer in self.model.seed_layers.values() for b in layer.buffers(recurse=False)
        }
        tensors = {
            id(t): (t, t.detach().clone())
            for t in itertools.chain(self.model.parameters(), self.model.buffers())
            if id(t) not in bookkeeping
        }
        optim = {
            id(p): copy.deepcopy(self.optimizer.state[p])
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p in self.optimizer.state
        }
        self._since_snapshot = 0
        return _Snapshot(self.steps, tensors, optim, self._ema, self._good)

    def _rollback(self, value: float) -> None:
        """Back to the last snapshot; seeds grafted since it are culled (they are new there)."""
        snap = self._snapshot
        self._counts["rollbacks"] += 1
        self._in_a_row += 1
        culled: list[_Adaptation] = []
        for name, layer in self.model.seed_layers.items():
            for idx in range(layer.num_seeds):
                if layer.stages[idx] not in GRAFTED_STAGES:
                    continue
                if all(id(p) in snap.tensors for p in self.model.seed_parameters(name, idx)):
                    continue
                self.model.unload_kernel(name, idx, optimizer=self.optimizer)
                self._fossils.pop((name, idx), None)
                adaptation = self._active.get((name, idx))
                if adaptation is not None:
                    adaptation.params = []
                    culled.append(adaptation)
        with torch.no_grad():
            for live, saved in snap.tensors.values():
                live.copy_(saved)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                saved = snap.optim.get(id(p))
                if saved is None:
                    self.optimizer.state.pop(p, None)
                else:
                    self.optimizer.state[p] = copy.deepcopy(saved)
        self._ema, self._good = snap.ema, snap.good  # expect the snapshot's loss again
        self._emas.clear()
        self._since_snapshot = 0
        self._metric_now = None
        logger.warning(
            "loss spike: rolled back to the last good snapshot",
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
            and self._write_failures == 0  # the server is known to be down: ask later
            and self._ema is not None
            and self.steps % self.decide_every == 0
            and remaining >= self.training_steps + self.model.blend_steps + self.probation_steps
        )

    def _ask(self) -> None:
        asked = _Asked(self.steps, time.monotonic(), self._metric(), self._ema)
        window = list(self._emas)
        loss_trend = (
            (window[-1] - window[0]) / max(abs(window[0]), 1e-12)
            if len(window) == self._emas.maxlen
            else None
        )
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
        future = self._executor.submit(
            self.client.request, "POST", f"runs/{self.run_id}/decisions/", body
        )
        self._asked = (future, asked)

    def _collect(self) -> None:
        """Pick up answers that arrived since the last step."""
        if self._asked is not None and self._asked[0].done():
            future, asked = self._asked
            self._asked = None
            try:
                self._decided(future.result(), asked)
            except KasminaError as exc:
                logger.warning("decision request failed", extra={"error": str(exc)})
        for adaptation in list(self._active.values()):
            future = adaptation.poll
            if future is None or not future.done():
                continue
            adaptation.poll = None
            try:
                info = future.result()
            except KasminaError as exc:
                logger.info("kernel poll failed", extra={"kernel": adaptation.kernel, "error": exc})
                continue
            self._kernel_status(adaptation, info.status, info.error)

    def _decided(self, answer: dict, asked: _Asked) -> None:
        self._counts["decisions"] += 1
        experience = str(answer["experience"])
        if answer["action"] != "germinate":
            self._counts["waits"] += 1
            self._waits.append((experience, asked))
            return
        layer_name, seed, kernel = answer.get("layer"), answer.get("seed"), answer.get("kernel")
        row = {
            "experience": experience,
            "step": asked.step,
            "layer": layer_name,
            "seed": seed,
            "blueprint": answer.get("blueprint"),
            "kernel": kernel,
            "policy": answer.get("policy"),
            "final_stage": None,
            "contribution": None,
            "params_added": 0,
            "rolled_back": False,
            "decision_to_training_s": None,
            "decision_to_training_steps": None,
            "finished_step": None,
        }
        self.adaptations.append(row)
        adaptation = _Adaptation(experience, layer_name, seed, str(kernel), asked, row)
        try:
            layer = self.model.layer(layer_name)
            adaptation.errors_at_start = layer.error_counts[layer.check_index(seed)]
            if kernel is None or (layer_name, seed) in self._active:
                raise ValueError(f"{layer_name}[{seed}] is busy or no kernel was granted")
            self.model.germinate(layer_name, seed, str(kernel))
        except ValueError as exc:
            logger.warning("germinate decision not applicable", extra={"error": str(exc)})
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
                adaptation.poll = self._executor.submit(self.client.get_kernel, adaptation.kernel)

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
    def _track(self) -> None:
        """Follow each seed's stage: new parameters into the optimizer, timed moves, judging."""
        for key, params in list(self._fossils.items()):
            if self.model.layer(key[0]).stages[key[1]] is not Stage.FOSSILIZED:
                _optimizer_remove(self.optimizer, params)
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
            _optimizer_remove(self.optimizer, adaptation.params)  # the module is gone
            adaptation.params = []
        if stage is Stage.TRAINING and not adaptation.params:
            adaptation.params = self.model.seed_parameters(adaptation.layer, adaptation.seed)
            self.optimizer.add_param_group({"params": adaptation.params})
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
            self.model.unload_kernel(name, idx, optimizer=self.optimizer)
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
        if metric_after is None:
            metric_after = self._metric()
        self._counts[final.name.lower()] += 1
        adaptation.row.update(
            final_stage=final.name,
            contribution=contribution,
            params_added=params_added,
            rolled_back=rolled_back,
            finished_step=self.steps,
        )
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
            self._report(experience, {"metric_before": asked.metric, "metric_after": self._metric()})

    # -- the outbox ----------------------------------------------------------------------
    def _run_opened(self, body: dict) -> None:
        self.run_id = str(body["id"])
        logger.info("training run opened", extra={"run": self.run_id})

    def _report(self, experience: str, outcome: dict) -> None:
        self._enqueue(
            "PATCH", lambda: f"experiences/{experience}/", {"outcome": outcome}, "outcome"
        )

    def _patch_run(self, body: dict, what: str) -> None:
        self._enqueue(
            "PATCH", lambda: f"runs/{self.run_id}/" if self.run_id else None, body, what
        )

    def _enqueue(self, method: str, path, body: dict, what: str, **options) -> None:
        if self.client is None:
            return
        with self._lock:
            self._outbox.append(_Write(method, path, body, what, **options))

    def _pump(self) -> None:
        """Start draining the outbox on the background thread (unless busy or backing off)."""
        if (
            not self._outbox
            or self._executor is None
            or self._closed
            or (self._drain is not None and not self._drain.done())
            or time.monotonic() < self._retry_at
        ):
            return
        self._drain = self._executor.submit(self._drain_outbox)

    def _drain_outbox(self) -> None:
        """Send writes in order; stop at the first that cannot reach the server (background)."""
        while True:
            with self._lock:
                if not self._outbox:
                    return
                item = self._outbox[0]
            path = item.path()
            answer = None
            if path is None:
                logger.error("write dropped: the run was never opened", extra={"what": item.what})
            else:
                try:
                    answer = self.client.request(
                        item.method, path, item.body, idempotent=item.idempotent
                    )
                except RegistryUnavailable as exc:
                    self._write_failures += 1
                    delay = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (self._write_failures - 1))
                    self._retry_at = time.monotonic() + delay
                    logger.warning(
                        "server unreachable; write kept for retry",
                        extra={"what": item.what, "retry_in_s": delay, "error": str(exc)},
                    )
                    return
                except KasminaError as exc:  # a 4xx: sending it again cannot help
                    logger.error("write refused", extra={"what": item.what, "error": str(exc)})
            with self._lock:
                self._outbox.popleft()
            self._write_failures = 0
            if answer is not None and item.on_done is not None:
                item.on_done(answer)
