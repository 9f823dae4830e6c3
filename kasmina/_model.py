"""`wrap()` and `MorphableModel`: a copy of the caller's model whose target layers host seeds."""

from __future__ import annotations

import copy
import logging
import math
import time
import weakref
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from kasmina._layer import SeedLayer, check_int, host_signature, kernel_id_from_tensor
from kasmina.errors import KasminaError
from kasmina.lifecycle import GRAFTED_STAGES, Stage, alpha_schedule

__all__ = ["MorphableModel", "wrap"]

logger = logging.getLogger(__name__)

DEFAULT_TARGET = (nn.Linear, nn.Conv2d)
Key = tuple[str, int]


# Modules that compute with their Linear children's weights directly (and, for the
# Transformer layers, in their no-grad fast path) instead of calling them: seeds there would
# be bypassed, so those Linears never host seeds.
_READS_CHILD_WEIGHTS = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def _bypassed(model: nn.Module) -> dict[str, str]:
    """{name of a direct child Linear of a `_READS_CHILD_WEIGHTS` module: that module's type}."""
    out = {}
    for parent_name, parent in model.named_modules():
        if isinstance(parent, _READS_CHILD_WEIGHTS):
            for child_name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    name = f"{parent_name}.{child_name}" if parent_name else child_name
                    out[name] = type(parent).__name__
    return out


def _check_materialised(name: str, module: nn.Module) -> None:
    """Lazy modules (`nn.LazyLinear`, ...) have no shape until their first forward pass: a
    seed layer wrapping one would have no signature for kernels to fit."""
    if any(is_lazy(p) for p in module.parameters()):
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) has uninitialized (lazy) parameters: "
            "run one forward pass through the model (to materialise them) before wrap()"
        )


def _root_error(model: nn.Module) -> ValueError:
    return ValueError(
        f"the root module ({type(model).__name__}) cannot host seeds: a seed layer takes its "
        "host's place in a parent module; wrap a container holding it, e.g. "
        "wrap(nn.Sequential(layer))"
    )


def _select_targets(model: nn.Module, target) -> list[tuple[str, nn.Module]]:
    named = [(n, m) for n, m in model.named_modules() if n]
    bypassed = _bypassed(model)
    if isinstance(target, (list, tuple)) and target and all(isinstance(t, type) for t in target):
        target = tuple(target)  # a list of types reads like a tuple of them
    elif isinstance(target, (list, tuple)) and not all(isinstance(t, str) for t in target):
        raise TypeError(
            "target must be a module type, a list or tuple of module types (e.g. [nn.Linear]) "
            f"or a list of qualified layer names (e.g. ['encoder.fc1']), got {target!r}"
        )
    if isinstance(target, type) or (
        isinstance(target, tuple) and all(isinstance(t, type) for t in target)
    ):
        matched = [(n, m) for n, m in named if isinstance(m, target)]
        if not matched and isinstance(model, target):
            raise _root_error(model)
        chosen = [(n, m) for n, m in matched if n not in bypassed]
        if len(chosen) < len(matched):
            logger.info(
                "layers left without seeds: their parent computes with their weights "
                "directly, bypassing a seed",
                extra={"layers": sorted(n for n, _ in matched if n in bypassed)},
            )
    else:
        if isinstance(target, str):
            target = [target]
        index = dict(named)
        chosen = []
        for name in target:
            if name == "" and isinstance(model, DEFAULT_TARGET):
                raise _root_error(model)
            if name not in index:
                candidates = [n for n, m in named if isinstance(m, DEFAULT_TARGET)]
                raise ValueError(
                    f"model has no module named {name!r}; layers that can host seeds: "
                    + ", ".join(candidates)
                )
            host_signature(index[name])
            if name in bypassed:
                raise ValueError(
                    f"{name!r} cannot host seeds: its parent {bypassed[name]} computes with "
                    "its weight directly instead of calling it, which would bypass a seed; "
                    "target the model's own Linear layers (a feed-forward block's)"
                )
            chosen.append((name, index[name]))
    if not chosen:
        raise ValueError(f"no module of the model matches target={target!r}")
    for name, module in chosen:
        _check_materialised(name, module)
    return chosen


def _auto_bridges(model: nn.Module) -> list[tuple[SeedLayer, SeedLayer]]:
    """(source, consumer) pairs: Linear seed layers that follow each other in an nn.Sequential
    with only parameter-free leaf modules (activations, dropout) between them, where the
    first one's output width is the second one's input width -- a hidden layer to widen.
    A layer registered in more than one slot runs more than once per forward pass, so which
    input a bridge would read is ambiguous: it takes part in no automatic bridge."""
    slots = Counter(
        id(child)
        for parent in model.modules()
        for child in parent._modules.values()
        if child is not None
    )
    pairs = []
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        prev: SeedLayer | None = None
        for child in parent._modules.values():  # every slot, a module registered twice too
            if child is None:
                continue
            if isinstance(child, SeedLayer) and slots[id(child)] > 1:
                prev = None
            elif isinstance(child, SeedLayer):
                if (
                    prev is not None
                    and isinstance(prev.host, nn.Linear)
                    and isinstance(child.host, nn.Linear)
                    and prev.host.out_features == child.host.in_features
                ):
                    pairs.append((prev, child))
                prev = child
            elif next(child.parameters(), None) is not None or next(child.children(), None):
                prev = None
    return pairs


class MorphableModel(nn.Module):
    """A model whose target layers host dormant seeds; see `wrap`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        target=DEFAULT_TARGET,
        seeds_per_layer: int = 1,
        loader=None,
        telemetry_every: int = 0,
        blend_steps: int = 100,
        blend_schedule: str = "linear",
        embargo_steps: int = 100,
        max_failures: int = 3,
        bridges: str | Mapping[str, str] | None = "auto",
    ) -> None:
        super().__init__()
        telemetry_every = check_int("telemetry_every", telemetry_every, 0)  # 0: never
        blend_steps = check_int("blend_steps", blend_steps, 1)
        embargo_steps = check_int("embargo_steps", embargo_steps, 0)
        max_failures = check_int("max_failures", max_failures, 1)
        alpha_schedule(0, 1, blend_schedule)  # fail early on an unknown schedule
        self.model = copy.deepcopy(model)
        self.loader = loader
        self.telemetry_every = telemetry_every
        self.blend_steps = blend_steps
        self.blend_schedule = blend_schedule
        self.embargo_steps = embargo_steps
        self.max_failures = max_failures
        self._layers: dict[str, SeedLayer] = {}
        by_id: dict[int, SeedLayer] = {}
        for name, module in _select_targets(self.model, target):
            by_id[id(module)] = SeedLayer(module, layer_name=name, num_seeds=seeds_per_layer)
            self._layers[name] = by_id[id(module)]
        # Replace every reference, so a layer shared by two parents, or registered in two
        # slots of one parent (`named_children()` would yield it once), stays shared.
        for parent in list(self.model.modules()):
            for attr, child in list(parent._modules.items()):
                if child is not None and id(child) in by_id and not isinstance(parent, SeedLayer):
                    setattr(parent, attr, by_id[id(child)])
        self._set_bridges(bridges)
        self.steps = 0
        self.events: deque[dict] = deque(maxlen=10_000)
        self._pending: dict[Key, Future] = {}
        self._retry_at: dict[Key, float] = {}
        self._blend_start: dict[Key, int] = {}
        self._embargo_until: dict[Key, int] = {}
        self._stage_since: dict[Key, int] = {}
        self._grad_norms: dict[str, torch.Tensor] = {}
        self._optimizers: weakref.WeakSet = weakref.WeakSet()
        self.generation = 0  # checkpoint loads so far (seed parameters may be new objects)

    def __deepcopy__(self, memo) -> MorphableModel:
        """A copy (`copy.deepcopy`, EMA/SWA's `AveragedModel`) with its own seeds and state,
        sharing the kernel loader (with its client, cache and thread); it has no fetch in
        flight and no optimizer attached."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "loader":
                new.__dict__[key] = value
            elif key == "_pending":
                new.__dict__[key] = {}
            elif key == "_optimizers":
                new.__dict__[key] = weakref.WeakSet()
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep `optimizer` in step when `load_state_dict` replaces seed modules: their old
        parameters leave it and the new ones join it (held weakly)."""
        self._optimizers.add(optimizer)

    def _set_bridges(self, bridges: str | Mapping[str, str] | None) -> None:
        if bridges == "auto":
            pairs = _auto_bridges(self.model)
        elif bridges is None:
            pairs = []
        elif isinstance(bridges, Mapping):
            pairs = [(self.layer(src), self.layer(dst)) for dst, src in bridges.items()]
        else:
            raise ValueError(
                f"bridges must be 'auto', None or a mapping {{consumer layer: source layer}}, "
                f"got {bridges!r}"
            )
        fed = [source.layer_name for source, _ in pairs]
        twice = sorted({name for name in fed if fed.count(name) > 1})
        if twice:
            raise ValueError(
                f"bridges: layer {twice[0]!r} feeds more than one bridge site; each source "
                "layer feeds one"
            )
        for source, consumer in pairs:
            consumer.set_bridge_source(source)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # -- lookup --------------------------------------------------------------------------
    @property
    def seed_layers(self) -> dict[str, SeedLayer]:
        return dict(self._layers)

    def layer(self, layer_name: str) -> SeedLayer:
        try:
            return self._layers[layer_name]
        except KeyError:
            raise ValueError(
                f"no seed layer {layer_name!r}; seed layers: {', '.join(self._layers)}"
            ) from None

    def _seed(self, layer_name: str, seed_idx: int) -> tuple[SeedLayer, int]:
        layer = self.layer(layer_name)
        return layer, layer.check_index(seed_idx)

    def seed_parameters(self, layer_name: str | None = None, seed_idx: int | None = None):
        """Parameters of grafted seeds (all, one layer's, or one seed's)."""
        layers = [self.layer(layer_name)] if layer_name is not None else self._layers.values()
        params = []
        for layer in layers:
            for key, module in layer.seeds.items():
                if seed_idx is None or key == str(seed_idx):
                    params.extend(p for p in module.parameters() if p.requires_grad)
        return params

    # -- lifecycle -----------------------------------------------------------------------
    def _move(self, layer: SeedLayer, idx: int, target: Stage, reason: str = "") -> None:
        before = layer.stages[idx]
        layer.transition(idx, target)
        key = (layer.layer_name, idx)
        self._stage_since[key] = self.steps
        self.events.append(
            {
                "step": self.steps,
                "layer": layer.layer_name,
                "seed": idx,
                "from": before.name,
                "to": target.name,
                "kernel": layer.kernel_ids[idx],
                "reason": reason,
            }
        )
        if target is Stage.BLENDING:
            self._blend_start[key] = self.steps
        elif target is Stage.CULLED:
            self._drop(layer, idx)
        elif target is Stage.EMBARGOED:
            self._embargo_until[key] = self.steps + self.embargo_steps
        elif target is Stage.DORMANT:
            layer.reset_seed(idx)

    def _drop(self, layer: SeedLayer, idx: int) -> None:
        key = (layer.layer_name, idx)
        future = self._pending.pop(key, None)
        if future is not None:
            future.cancel()
        self._retry_at.pop(key, None)
        self._blend_start.pop(key, None)
        layer.remove_seed(idx)

    def advance(self, layer_name: str, seed_idx: int, stage: Stage | str, reason: str = "") -> None:
        """Move a seed to `stage` (raises `IllegalTransition` for a move the lifecycle forbids)."""
        layer, idx = self._seed(layer_name, seed_idx)
        stage = Stage[stage] if isinstance(stage, str) else Stage(stage)
        if (
            stage in (Stage.LOADING, Stage.TRAINING)
            and layer.stages[idx] is not Stage.ERROR_RECOVERY
        ):
            raise ValueError("use load_kernel()/germinate() to load a kernel into a seed")
        self._move(layer, idx, stage, reason)

    def germinate(self, layer_name: str, seed_idx: int, kernel_id: str) -> None:
        """Reserve a dormant seed for `kernel_id` (it may still be compiling): DORMANT → GERMINATED."""
        layer, idx = self._seed(layer_name, seed_idx)
        self._require_dormant(layer, idx)
        layer.kernel_ids[idx] = str(kernel_id)
        self._move(layer, idx, Stage.GERMINATED, "germinate")

    def begin_load(self, layer_name: str, seed_idx: int) -> None:
        """Fetch a germinated seed's kernel on the background thread: GERMINATED → LOADING."""
        layer, idx = self._seed(layer_name, seed_idx)
        self._move(layer, idx, Stage.LOADING, "kernel ready")
        self._submit(layer, idx)

    def _require_dormant(self, layer: SeedLayer, idx: int) -> None:
        if layer.stages[idx] is not Stage.DORMANT:
            free = [i for i, s in enumerate(layer.stages) if s is Stage.DORMANT]
            raise ValueError(
                f"{layer.layer_name}[{idx}] is {layer.stages[idx].name}, not DORMANT; "
                f"dormant seeds of this layer: {free or 'none'}"
            )

    def _require_loader(self):
        if self.loader is None:
            raise ValueError(
                "this model has no kernel loader: wrap(model, client=EsperClient(...)) "
                "or pass loader=KernelLoader(...)"
            )
        return self.loader

    def load_kernel(
        self, layer_name: str, seed_idx: int, kernel_id: str, *, optimizer=None
    ) -> Stage:
        """Fetch, verify and graft a kernel now (→ TRAINING).

        A kernel that does not fit the layer raises `ValueError` and the seed stays DORMANT.
        A registry or artifact failure does not raise: the seed goes to ERROR_RECOVERY and
        `step()` retries with backoff. Returns the seed's stage.
        """
        layer, idx = self._seed(layer_name, seed_idx)
        self._require_dormant(layer, idx)
        loader = self._require_loader()
        layer.kernel_ids[idx] = str(kernel_id)
        try:
            loaded = loader.fetch(str(kernel_id))
        except KasminaError as exc:
            self._move(layer, idx, Stage.GERMINATED, "load_kernel")
            self._move(layer, idx, Stage.LOADING, "load_kernel")
            self._fail(layer, idx, f"load failed: {exc}")
            return layer.stages[idx]
        module = self._fit(layer, idx, loaded)
        self._move(layer, idx, Stage.GERMINATED, "load_kernel")
        self._move(layer, idx, Stage.LOADING, "load_kernel")
        self._install(layer, idx, loaded, module, optimizer)
        return layer.stages[idx]

    def unload_kernel(
        self, layer_name: str, seed_idx: int, *, optimizer=None, reason: str = "unload_kernel"
    ) -> None:
        """Cull a seed: its module is removed and the layer's output is the host's, exactly."""
        layer, idx = self._seed(layer_name, seed_idx)
        params = self.seed_parameters(layer_name, idx)
        self._move(layer, idx, Stage.CULLED, reason)
        if optimizer is not None:
            optimizer_remove(optimizer, params)

    def set_alpha(self, layer_name: str, seed_idx: int, alpha: float) -> None:
        layer, idx = self._seed(layer_name, seed_idx)
        if layer.stages[idx] not in (Stage.BLENDING, Stage.PROBATION):
            raise ValueError(
                f"{layer_name}[{idx}] is {layer.stages[idx].name}; α applies to BLENDING and "
                "PROBATION seeds (advance a TRAINING seed to BLENDING first)"
            )
        self._blend_start.pop((layer_name, idx), None)  # manual α overrides the ramp
        layer.set_alpha(idx, alpha)

    def _fit(self, layer: SeedLayer, idx: int, loaded) -> nn.Module:
        sig, want = loaded.signature, layer.signature
        graft = sig.get("graft")
        n_in, n_out = layer.graft_dims(graft)  # ValueError for an unknown graft or no bridge
        if (sig.get("layout"), sig.get("in"), sig.get("out")) != (want["layout"], n_in, n_out):
            raise ValueError(
                f"kernel {loaded.kernel_id} ({graft}/{sig.get('layout')} "
                f"{sig.get('in')}→{sig.get('out')}) does not fit layer {layer.layer_name!r} "
                f"({type(layer.host).__name__}, {want['layout']} {want['in']}→{want['out']}); "
                f"request a kernel with signature {{'graft': '{graft}', "
                f"'layout': '{want['layout']}', 'in': {n_in}, 'out': {n_out}}}"
            )
        weight = next(layer.host.parameters())
        module = loaded.module.to(device=weight.device, dtype=weight.dtype)

        side = _probe_side(layer.host)

        def zeros(width: int) -> torch.Tensor:
            if want["layout"] == "features":
                return weight.new_zeros(2, width)
            return weight.new_zeros(2, width, side, side)

        with torch.no_grad():
            x = zeros(want["in"])
            try:
                h = layer.host(x)
            except Exception as exc:
                raise ValueError(
                    f"layer {layer.layer_name!r} failed on a shape probe of {tuple(x.shape)} "
                    f"before kernel {loaded.kernel_id} could be checked: {exc}"
                ) from exc
            was_training = module.training
            module.eval()
            try:
                s = module(h if graft == "residual" else x if graft == "parallel" else zeros(n_in))
            except Exception as exc:
                raise ValueError(
                    f"kernel {loaded.kernel_id} failed its shape probe on layer "
                    f"{layer.layer_name!r}: {exc}"
                ) from exc
            finally:
                module.train(was_training)
        if s.shape != h.shape:
            raise ValueError(
                f"kernel {loaded.kernel_id} outputs {tuple(s.shape)} where layer "
                f"{layer.layer_name!r} outputs {tuple(h.shape)}"
            )
        return module

    def _install(self, layer: SeedLayer, idx: int, loaded, module: nn.Module, optimizer) -> None:
        layer.graft(idx, module, kernel_id=loaded.kernel_id, graft=loaded.signature["graft"])
        key = (layer.layer_name, idx)
        self._stage_since[key] = self.steps
        self._retry_at.pop(key, None)
        self.events.append(
            {
                "step": self.steps,
                "layer": layer.layer_name,
                "seed": idx,
                "from": "LOADING",
                "to": "TRAINING",
                "kernel": loaded.kernel_id,
                "reason": "grafted",
            }
        )
        if optimizer is not None:
            optimizer_add(optimizer, self.seed_parameters(layer.layer_name, idx), layer)

    def _fail(self, layer: SeedLayer, idx: int, reason: str) -> None:
        """A seed failed: host output in use; retried with backoff, culled after repeats."""
        errors = layer.record_error(idx)
        layer.remove_seed(idx)
        logger.warning(
            "seed %s[%d] failed: %s",
            layer.layer_name,
            idx,
            reason,
            extra={"layer": layer.layer_name, "seed": idx, "error": reason},
        )
        if layer.stages[idx] is Stage.FOSSILIZED:
            self._move(layer, idx, Stage.CULLED, f"fossilized seed failed: {reason}")
            return
        if layer.stages[idx] is not Stage.ERROR_RECOVERY:
            self._move(layer, idx, Stage.ERROR_RECOVERY, reason)
        kernel_id = layer.kernel_ids[idx]
        breaker_open = (
            self.loader is not None
            and kernel_id is not None
            and self.loader.failures(kernel_id) >= self.max_failures
        )
        if errors >= self.max_failures or breaker_open:
            self._move(layer, idx, Stage.CULLED, f"culled after {errors} failures: {reason}")
            return
        retry_at = time.monotonic() + min(60.0, 0.5 * 2 ** (errors - 1))
        if self.loader is not None and kernel_id is not None:
            retry_at = max(retry_at, self.loader.next_retry_at(kernel_id))
        self._retry_at[(layer.layer_name, idx)] = retry_at

    def _submit(self, layer: SeedLayer, idx: int) -> None:
        self._pending[(layer.layer_name, idx)] = self._require_loader().submit(
            layer.kernel_ids[idx]
        )

    # -- per training step ---------------------------------------------------------------
    def step(self) -> None:
        """Advance lifecycles by one training step; call it after `optimizer.step()`.

        Grafts kernels whose background fetch finished, retries failed seeds, ramps α,
        moves nonfinite seeds to ERROR_RECOVERY, ends embargoes and schedules telemetry.
        Never waits on the network.
        """
        self.steps += 1
        busy = [layer for layer in self._layers.values() if layer.busy]
        culled = {
            (layer.layer_name, i)
            for layer in busy
            for i, stage in enumerate(layer.stages)
            if stage is Stage.CULLED
        }
        if self._pending:
            self._poll_pending()
        self._check_nonfinite()
        now = time.monotonic()
        for layer in busy:
            for idx, stage in enumerate(layer.stages):
                key = (layer.layer_name, idx)
                if (
                    stage is Stage.ERROR_RECOVERY
                    and key in self._retry_at
                    and now >= self._retry_at[key]
                ):
                    del self._retry_at[key]
                    self._move(layer, idx, Stage.LOADING, "retry")
                    self._submit(layer, idx)
                elif stage is Stage.BLENDING and key in self._blend_start:
                    done = self.steps - self._blend_start[key]
                    layer.set_alpha(
                        idx, alpha_schedule(done, self.blend_steps, self.blend_schedule)
                    )
                    if done >= self.blend_steps:
                        self._move(layer, idx, Stage.PROBATION, "blend complete")
                elif stage is Stage.CULLED and key in culled:  # culled for one full step
                    self._move(layer, idx, Stage.EMBARGOED, "embargo")
                elif stage is Stage.EMBARGOED and self.steps >= self._embargo_until.get(key, 0):
                    self._move(layer, idx, Stage.DORMANT, "embargo over")
            layer.flush_latency()
        if self.telemetry_every and self.steps % self.telemetry_every == 0:
            self._sample_gradients()
            for layer in self._layers.values():
                layer.request_sample()

    def _poll_pending(self) -> None:
        for key, future in list(self._pending.items()):
            if not future.done():
                continue
            del self._pending[key]
            layer, idx = self._layers[key[0]], key[1]
            if layer.stages[idx] is not Stage.LOADING:
                continue
            try:
                loaded = future.result()
                module = self._fit(layer, idx, loaded)
            except Exception as exc:  # noqa: BLE001 - a kernel that cannot load never stops training
                self._fail(layer, idx, f"load failed: {exc}")
                continue
            self._install(layer, idx, loaded, module, optimizer=None)

    def _check_nonfinite(self) -> None:
        live = [(layer, i) for layer in self._layers.values() for i in layer._live]
        if not live:
            return
        flags = torch.stack([layer.seed_fallback[i] for layer, i in live]).tolist()
        for (layer, idx), bad in zip(live, flags, strict=True):
            if bad:
                self._fail(layer, idx, "non-finite seed output")

    @torch.no_grad()
    def _sample_gradients(self) -> None:
        for name, layer in self._layers.items():
            grads = [p.grad for p in layer.host.parameters() if p.grad is not None]
            if grads:
                self._grad_norms[name] = torch.linalg.vector_norm(
                    torch.stack(torch._foreach_norm(grads)).float()
                )

    # -- introspection -------------------------------------------------------------------
    def health(self) -> dict:
        """Per-layer telemetry as plain data (this reads device tensors: call it between steps)."""
        layers = []
        for name, layer in self._layers.items():
            act = layer._telemetry.get("activation")
            act_values = act.tolist() if act is not None else None
            grad = self._grad_norms.get(name)
            layers.append(
                {
                    "name": name,
                    "type": type(layer.host).__name__,
                    **layer.signature,
                    "bridge_from": None
                    if layer.bridge_source is None
                    else layer.bridge_source.layer_name,
                    "params": sum(p.numel() for p in layer.host.parameters()),
                    "activation": None
                    if act_values is None
                    else dict(zip(("mean", "std", "dead_fraction"), act_values, strict=True)),
                    "grad_norm": None if grad is None else float(grad),
                    "seeds": [
                        {
                            "index": i,
                            "stage": layer.stages[i].name,
                            "alpha": layer.alphas[i],
                            "kernel_id": layer.kernel_ids[i],
                            "graft": layer.grafts[i],
                            "latency_us": layer.latency_us[i],
                            "health": float(layer.seed_health_ema[i]),
                            "errors": layer.error_counts[i],
                            "steps_in_stage": self.steps - self._stage_since.get((name, i), 0),
                            "params": sum(p.numel() for p in layer.seeds[str(i)].parameters())
                            if str(i) in layer.seeds
                            else 0,
                        }
                        for i in range(layer.num_seeds)
                    ],
                }
            )
        return {"step": self.steps, "layers": layers}

    def graph_document(
        self,
        *,
        progress: float,
        budget_used: float = 0.0,
        loss: float | None = None,
        loss_trend: float | None = None,
        val_metric: float | None = None,
        val_trend: float | None = None,
    ) -> dict:
        """What `POST /runs/{id}/decisions/` takes: `health()` plus the run's global state."""
        health = self.health()
        return {
            "schema": "esper.graph/1",
            "step": health["step"],
            "layers": health["layers"],
            "globals": {
                "progress": progress,
                "loss": loss,
                "loss_trend": loss_trend,
                "val_metric": val_metric,
                "val_trend": val_trend,
                "budget_used": budget_used,
            },
        }

    def stats(self) -> dict:
        layers = []
        for name, layer in self._layers.items():
            live = [layer.latency_us[i] for i in layer._live if layer.latency_us[i] > 0]
            layers.append(
                {
                    "layer": name,
                    "type": type(layer.host).__name__,
                    "seeds_by_stage": dict(Counter(s.name for s in layer.stages)),
                    "forward_count": layer.forward_count,
                    "mean_latency_us": sum(live) / len(live) if live else None,
                }
            )
        cache = getattr(self.loader, "cache", None)
        return {"steps": self.steps, "layers": layers, "cache": cache.stats() if cache else None}

    # -- checkpoints ---------------------------------------------------------------------
    def load_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False
    ):
        """Load a checkpoint, fetching the kernels of its grafted seeds first.

        A seed that holds the same kernel here as in the checkpoint keeps its module, and its
        parameters are loaded in place: restoring the best weights mid-run leaves them in the
        optimizer. Seed modules that come or go leave or join the optimizers attached with
        `attach_optimizer` (a Controller attaches its own); `generation` counts the loads.
        """
        resume: list[tuple[SeedLayer, int]] = []
        gone: list[nn.Parameter] = []
        new: list[tuple[SeedLayer, list[nn.Parameter]]] = []
        for name, layer in self._layers.items():
            prefix = f"model.{name}."
            if prefix + "seed_stage" not in state_dict:
                continue
            stages = [Stage(int(v)) for v in state_dict[prefix + "seed_stage"].tolist()]
            ids = state_dict[prefix + "seed_kernel_id"]
            for idx, stage in enumerate(stages):
                kept = dict(layer.seeds.items()).get(str(idx))
                if (
                    kept is not None
                    and stage in GRAFTED_STAGES
                    and layer.stages[idx] in GRAFTED_STAGES
                    and layer.kernel_ids[idx] == kernel_id_from_tensor(ids[idx])
                ):
                    continue  # the same kernel: its parameters load in place
                if kept is not None:
                    gone.extend(kept.parameters())
                self._drop(layer, idx)
                if stage in GRAFTED_STAGES:
                    loaded = self._require_loader().fetch(_kernel_id(ids[idx]))
                    module = self._fit(layer, idx, loaded)
                    layer.put_seed(idx, module)
                    new.append((layer, [p for p in module.parameters() if p.requires_grad]))
                elif stage in (Stage.GERMINATED, Stage.LOADING, Stage.ERROR_RECOVERY):
                    resume.append((layer, idx))
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        for optimizer in list(self._optimizers):
            optimizer_remove(optimizer, gone)
            for layer, params in new:
                optimizer_add(optimizer, params, layer)
        self.generation += 1
        for layer in self._layers.values():
            layer.sync_mirror()
        for layer in self._layers.values():
            for idx, stage in enumerate(layer.stages):
                if stage is Stage.BLENDING:  # continue the ramp from the restored α
                    done = _steps_for_alpha(
                        layer.alphas[idx], self.blend_steps, self.blend_schedule
                    )
                    self._blend_start[(layer.layer_name, idx)] = self.steps - done
        for layer, idx in resume:
            if layer.stages[idx] is Stage.ERROR_RECOVERY:
                self._retry_at[(layer.layer_name, idx)] = time.monotonic()
            elif layer.stages[idx] is Stage.LOADING:
                self._submit(layer, idx)
        return result


def _probe_side(host: nn.Module) -> int:
    """Height and width of a shape probe that a Conv2d host accepts: at least 8, and enough
    for its kernel, dilation and padding to leave an output of 2 or more."""
    if not isinstance(host, nn.Conv2d):
        return 8
    if host.padding == "same":
        return 8
    padding = (0, 0) if host.padding == "valid" else host.padding
    need = 8
    for k, d, p, s in zip(host.kernel_size, host.dilation, padding, host.stride, strict=True):
        need = max(need, d * (k - 1) + 1 - 2 * p + s)
    return need


def _steps_for_alpha(alpha: float, total: int, kind: str) -> int:
    """Inverse of `alpha_schedule`: how many blending steps give `alpha`."""
    t = alpha if kind == "linear" else math.acos(max(-1.0, min(1.0, 1 - 2 * alpha))) / math.pi
    return round(t * total)


def _kernel_id(row: torch.Tensor) -> str:
    kernel_id = kernel_id_from_tensor(row)
    if kernel_id is None:
        raise KasminaError("checkpoint has a grafted seed without a kernel id")
    return kernel_id


def optimizer_add(
    optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], layer: nn.Module
) -> None:
    """Put `params` (new seed parameters of `layer`) into the param group holding `layer`'s.

    They train with the host's current hyperparameters (a scheduled learning rate included),
    and the number of groups stays as it was: LR schedulers keep one entry per group
    (`LambdaLR`, `OneCycleLR` and others fail on a group added after them). They go where
    `layer.parameters()` has them among the layer's parameters already in that group, so a
    group made from `model.parameters()` keeps that order and an optimizer `state_dict`
    loads into one made afresh from the restored model (seed 0 before seed 1, whichever
    was grafted first). When none of the layer's other parameters is in the optimizer (a
    frozen host, or one another optimizer trains), `params` go at the end of the first
    group, `optimizer.param_groups[0]`, and train with its hyperparameters: a new group
    would break those schedulers. Parameters already in the optimizer are left alone.
    """
    present = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = [p for p in params if id(p) not in present]
    if not params:
        return
    order = {id(p): i for i, p in enumerate(layer.parameters())}
    owned = set(order) - {id(p) for p in params}
    _flat_history_stale(optimizer)
    first = min((order[id(p)] for p in params if id(p) in order), default=len(order))
    for group in optimizer.param_groups:
        at = [i for i, p in enumerate(group["params"]) if id(p) in owned]
        if at:
            before = [i for i in at if order.get(id(group["params"][i]), -1) < first]
            where = before[-1] + 1 if before else at[0]
            group["params"][where:where] = params  # in place: LBFGS holds the list
            return
    optimizer.param_groups[0]["params"].extend(params)  # never a new group (see above)


def _flat_history_stale(optimizer: torch.optim.Optimizer) -> None:
    """L-BFGS keeps one curvature history over all its parameters flattened together; once
    parameters come or go that history has the wrong length, so it starts afresh."""
    if isinstance(optimizer, torch.optim.LBFGS):
        optimizer.state.clear()
        optimizer._numel_cache = None  # its cached parameter count (recomputed when None)


def optimizer_remove(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> None:
    """Take `params` and their state out of `optimizer`. Every group stays, even one left
    empty (torch optimizers step over an empty group): the number of groups never changes,
    as LR schedulers made before (`LambdaLR`, `OneCycleLR`) keep one entry per group."""
    drop = {id(p) for p in params}
    if any(id(p) in drop for group in optimizer.param_groups for p in group["params"]):
        _flat_history_stale(optimizer)
    for group in optimizer.param_groups:
        group["params"][:] = [p for p in group["params"] if id(p) not in drop]  # in place
    for p in list(optimizer.state):
        if id(p) in drop:
            del optimizer.state[p]


def wrap(
    model: nn.Module,
    target=DEFAULT_TARGET,
    seeds_per_layer: int = 1,
    *,
    client=None,
    cache=None,
    loader=None,
    **options,
) -> MorphableModel:
    """Wrap a copy of `model`: every layer matching `target` (a type, a list or tuple of
    types, or a list of qualified names) hosts `seeds_per_layer` (1 to 16) dormant seeds.
    Outputs equal the original's while all seeds are dormant. Lazy layers must have run one
    forward pass first, and the root module itself cannot host seeds (wrap a container).

    `client` (an `EsperClient`) lets seeds load kernels from the registry; `cache` is a
    `KernelCache` (an in-memory one by default). Other options: `telemetry_every`,
    `blend_steps`, `blend_schedule` ('linear' | 'cosine'), `embargo_steps`, `max_failures`,
    `bridges`: which layer's bridge seeds read which layer's input -- "auto" (default: each
    nn.Linear seed layer fed by another through parameter-free modules of an nn.Sequential),
    None (no bridges), or a mapping {consumer layer: source layer}.
    """
    if any(isinstance(m, (MorphableModel, SeedLayer)) for m in model.modules()):
        raise ValueError(
            "the model is already wrapped (it holds seed layers): wrap the plain model once, "
            "with every layer that should host seeds in `target`"
        )
    if loader is None and client is not None:
        from kasmina.cache import KernelCache
        from kasmina.loader import KernelLoader

        loader = KernelLoader(client, cache if cache is not None else KernelCache())
    return MorphableModel(
        model, target=target, seeds_per_layer=seeds_per_layer, loader=loader, **options
    )
