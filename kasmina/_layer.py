"""The seed layer: a host module plus seed slots, with a one-check dormant fast path.

Per-seed state is a structure of arrays registered as buffers (so it is in `state_dict`)
and mirrored in plain Python lists: the forward pass decides what to do from the mirror
and never reads a device tensor. α enters the computation as a tensor (no sync, and no
recompiles under `torch.compile` when it changes).
"""

from __future__ import annotations

import operator
import time
import uuid

import torch
from torch import nn

from kasmina.lifecycle import GRAFTED_STAGES, Stage, check_transition

__all__ = [
    "MAX_SEEDS_PER_LAYER",
    "SeedLayer",
    "check_int",
    "host_signature",
    "kernel_id_from_tensor",
    "kernel_id_to_tensor",
]

_MASK64 = (1 << 64) - 1
# The most seeds a layer may hold: the decision server refuses a graph document with more
# (tamiyo/graph.py MAX_SEEDS, server side; kasmina does not import the server's code).
MAX_SEEDS_PER_LAYER = 16
GRAFT_CODES = ("residual", "parallel", "bridge")  # `seed_graft` buffer values


def kernel_id_to_tensor(kernel_id: str | None) -> torch.Tensor:
    """A UUID as two int64 (hi, lo); zeros for none."""
    if kernel_id is None:
        return torch.zeros(2, dtype=torch.int64)
    value = uuid.UUID(str(kernel_id)).int
    halves = [(value >> 64) & _MASK64, value & _MASK64]
    return torch.tensor([h - (1 << 64) if h >= 1 << 63 else h for h in halves], dtype=torch.int64)


def kernel_id_from_tensor(t: torch.Tensor) -> str | None:
    hi, lo = (int(v) & _MASK64 for v in t.tolist())
    value = (hi << 64) | lo
    return None if value == 0 else str(uuid.UUID(int=value))


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """`value` as an int, if it is an integer (not a bool, float or string) within
    [low, high]; a TypeError or ValueError that says what to pass otherwise."""
    bounds = f"between {low} and {high}" if high is not None else f">= {low}"
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)  # ints, and integer scalars such as numpy's
    except TypeError:
        raise TypeError(
            f"{name} must be an int {bounds}, got {type(value).__name__} {value!r}"
        ) from None
    if number < low or (high is not None and number > high):
        raise ValueError(f"{name} must be an int {bounds}, got {number}")
    return number


def host_signature(host: nn.Module) -> dict:
    """Layout and dims of a host layer, as a kernel signature needs them (no graft, no dtype)."""
    if isinstance(host, nn.Linear):
        return {"layout": "features", "in": host.in_features, "out": host.out_features}
    if isinstance(host, nn.Conv2d):
        return {"layout": "channels", "in": host.in_channels, "out": host.out_channels}
    raise ValueError(
        f"cannot host seeds in a {type(host).__name__}: seed layers wrap nn.Linear "
        "(features layout) and nn.Conv2d (channels layout)"
    )


class SeedLayer(nn.Module):
    """`host(x)` plus, per live seed, `α·s(h)` (residual graft), `α·s(x)` (parallel graft) or
    `α·s(x_src)` (bridge graft: `x_src` is the input of `bridge_source`, the seed layer that
    feeds this one, so the seed adds hidden units between the two)."""

    def __init__(self, host: nn.Module, *, layer_name: str, num_seeds: int = 1) -> None:
        super().__init__()
        num_seeds = check_int("seeds_per_layer", num_seeds, 1, MAX_SEEDS_PER_LAYER)
        self.host = host
        # Plain references for the forward pass (registered modules are reached through
        # nn.Module.__getattr__, a Python call per access): the host, and the live seeds.
        object.__setattr__(self, "_host", host)
        self._live_seeds: tuple[tuple[int, nn.Module], ...] = ()
        self.layer_name = layer_name
        self.num_seeds = num_seeds
        self.signature = host_signature(host)
        # Features seeds run on [N, width]: inputs with more leading dims (a sequence
        # model's [batch, seq, width]) are flattened for the kernel and reshaped back.
        self._features = self.signature["layout"] == "features"
        self.seeds = nn.ModuleDict()
        n = num_seeds
        self.register_buffer("seed_stage", torch.zeros(n, dtype=torch.int64))
        self.register_buffer("seed_alpha", torch.zeros(n, dtype=torch.float32))
        self.register_buffer("seed_kernel_id", torch.zeros(n, 2, dtype=torch.int64))
        self.register_buffer("seed_graft", torch.zeros(n, dtype=torch.int64))  # GRAFT_CODES
        self.register_buffer("seed_health_ema", torch.zeros(n, dtype=torch.float32))
        self.register_buffer("seed_latency_us", torch.zeros(n, dtype=torch.float32))
        self.register_buffer("seed_error_count", torch.zeros(n, dtype=torch.int32))
        self.register_buffer("seed_fallback", torch.zeros(n, dtype=torch.bool))
        # Host-side mirror: what the forward pass reads.
        self.stages: list[Stage] = [Stage.DORMANT] * n
        self.alphas: list[float] = [0.0] * n
        self.kernel_ids: list[str | None] = [None] * n
        self.grafts: list[str | None] = [None] * n
        self.error_counts: list[int] = [0] * n
        self.latency_us: list[float] = [0.0] * n
        self._live: tuple[int, ...] = ()
        self._bridged = False  # a live seed is a bridge graft
        self._active = False  # the dormant fast path's one check
        self.busy = False  # any seed not DORMANT (lets step() skip idle layers)
        self._sample = False
        self.forward_count = 0  # eager forwards through the seeds (compiled ones are not counted)
        self.guard_nonfinite = True
        self._telemetry: dict[str, torch.Tensor] = {}
        self._latency_pending: list[tuple[int, float]] = []
        # Bridges: `_source` is a 1-tuple (not a registered submodule) holding the layer whose
        # input bridge seeds here read; that layer keeps its latest input while `_taps` > 0.
        self._source: tuple[SeedLayer, ...] = ()
        self._taps = 0
        self._tapped: torch.Tensor | None = None

    def __getattr__(self, name: str):
        """Attributes the layer does not have are read from its host, so code that reads a
        wrapped layer's `weight`, `bias` or `out_features` keeps working. (Code that
        computes with `layer.weight` directly instead of calling the layer bypasses its
        seeds.)"""
        try:
            return super().__getattr__(name)
        except AttributeError:
            host = self.__dict__.get("_modules", {}).get("host")
            if host is None or name.startswith("__"):
                raise
            try:
                return getattr(host, name)
            except AttributeError:
                raise AttributeError(
                    f"'SeedLayer' object (hosting {type(host).__name__}) has no attribute {name!r}"
                ) from None

    # -- forward -------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        h = self._host(*args, **kwargs)
        if not self._active:
            return h
        return self._morph(args[0] if args else next(iter(kwargs.values())), h)

    def _morph(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # Under torch.compile nothing here may change a Python int or float on the module per
        # call: dynamo guards on such attributes and would recompile on every forward. So
        # compiled calls are not counted, and latency is not timed while compiling.
        compiling = torch.compiler.is_compiling()
        if not compiling:
            self.forward_count += 1
        if self._taps:
            self._tapped = x
        sample = self._sample
        if sample:
            self._sample = False
            self._record_activation(h)
            self._update_active()
        out = h
        x_src = self._take_bridge_input() if self._bridged else None
        # Kernels take a batch: features [..., width] -> [N, width], and an unbatched channels
        # input [C, H, W] -> [1, C, H, W]; the seed's output is reshaped to h's shape.
        flat = x.dim() != 2 if self._features else x.dim() == 3
        for i, seed in self._live_seeds:
            training = self.stages[i] is Stage.TRAINING
            graft = self.grafts[i]
            inp = h if graft == "residual" else x if graft == "parallel" else x_src
            if training:
                inp = inp.detach()  # the host is untouched while the seed incubates
            if flat:
                inp = inp.reshape(-1, inp.shape[-1]) if self._features else inp.unsqueeze(0)
            if sample and not compiling and h.device.type == "cpu":
                started = time.perf_counter()
                s = seed(inp)
                self._latency_pending.append((i, (time.perf_counter() - started) * 1e6))
            else:
                s = seed(inp)
            if flat:
                s = s.reshape(h.shape)
            if self.guard_nonfinite:
                # One reduction: a sum is finite iff every element is (barring an overflow
                # of finite values near the float maximum, which only makes it cautious).
                finite = torch.isfinite(s.sum())
                s = torch.where(finite, s, 0.0)
                self.seed_fallback[i] |= ~finite
            if sample:
                with torch.no_grad():
                    ratio = s.detach().float().norm() / (h.detach().float().norm() + 1e-12)
                    self.seed_health_ema[i].mul_(0.9).add_(0.1 * ratio)
            if training:
                out = out + (s - s.detach())
            else:
                out = out + self.seed_alpha[i].to(s.dtype) * s
        return out

    def _take_bridge_input(self) -> torch.Tensor:
        source = self._source[0]
        x_src, source._tapped = source._tapped, None
        if x_src is None:
            raise RuntimeError(
                f"a bridge seed of layer {self.layer_name!r} reads the input of "
                f"{source.layer_name!r}, which did not run before it in this forward pass, or "
                "whose input was already read: either the two layers do not feed each other "
                "(name the bridges that do: wrap(..., bridges={consumer: source})), or "
                f"{self.layer_name!r} ran again without {source.layer_name!r}, as when "
                "activation checkpointing recomputes the consumer alone (checkpoint both "
                "layers together, or wrap(..., bridges=None))"
            )
        return x_src

    @torch.no_grad()
    def _record_activation(self, h: torch.Tensor) -> None:
        """Mean, std and the fraction of units never positive in this batch (no sync)."""
        h = h.detach().float()
        mean = h.mean()
        std = ((h * h).mean() - mean * mean).clamp_min(0).sqrt()
        if self._features:  # units are the last dim, whatever comes before it
            per_unit = h.reshape(-1, h.shape[-1]).amax(dim=0)
        else:  # channels: dim 1 of [N, C, H, W], dim 0 of an unbatched [C, H, W]
            units = h.dim() - 3
            per_unit = h.amax(dim=tuple(d for d in range(h.dim()) if d != units))
        dead = (per_unit <= 0).float().mean()
        self._telemetry["activation"] = torch.stack([mean, std, dead])

    # -- control (called between steps, never from forward) ------------------------------
    def request_sample(self) -> None:
        """Record telemetry on the next forward."""
        self._sample = True
        self._active = True

    def _update_active(self) -> None:
        self._active = bool(self._live) or self._sample or self._taps > 0

    def refresh(self) -> None:
        """Recompute the live set and the fast-path flags from the mirror."""
        self._live = tuple(
            i for i, s in enumerate(self.stages) if s in GRAFTED_STAGES and str(i) in self.seeds
        )
        self._live_seeds = tuple((i, self.seeds[str(i)]) for i in self._live)
        self._bridged = any(self.grafts[i] == "bridge" for i in self._live)
        self._update_active()
        self.busy = any(stage is not Stage.DORMANT for stage in self.stages)
        if self._source:
            source = self._source[0]
            source._taps = int(self._bridged)
            source._tapped = None
            source._update_active()

    @property
    def bridge_source(self) -> SeedLayer | None:
        """The layer whose input this layer's bridge seeds read (None: no bridge grafts here)."""
        return self._source[0] if self._source else None

    def set_bridge_source(self, source: SeedLayer | None) -> None:
        if source is not None and (
            source is self
            or source.signature["layout"] != "features"
            or self.signature["layout"] != "features"
        ):
            raise ValueError(
                f"cannot bridge {source.layer_name!r} -> {self.layer_name!r}: a bridge joins two "
                "different nn.Linear layers"
            )
        self._source = () if source is None else (source,)

    def seed_signature(self, graft: str, dtype: str = "float32") -> dict:
        """The kernel signature a `graft` seed of this layer needs (ValueError if none fits)."""
        n_in, n_out = self.graft_dims(graft)
        layout = self.signature["layout"]
        return {"graft": graft, "layout": layout, "in": n_in, "out": n_out, "dtype": dtype}

    def graft_dims(self, graft: str) -> tuple[int, int]:
        """(in, out) widths a `graft` seed of this layer reads and writes."""
        sig = self.signature
        if graft in ("residual", "parallel"):
            return sig["in"], sig["out"]
        if graft == "bridge" and self._source:
            return self._source[0].signature["in"], sig["out"]
        if graft == "bridge":
            raise ValueError(
                f"layer {self.layer_name!r} has no bridge source: bridge seeds live on a Linear "
                "layer fed by another seed layer (wrap(..., bridges={'fc2': 'fc1'}))"
            )
        raise ValueError(f"unknown graft {graft!r}; grafts: {', '.join(GRAFT_CODES)}")

    def check_index(self, seed_idx: int) -> int:
        if not isinstance(seed_idx, int) or not 0 <= seed_idx < self.num_seeds:
            raise ValueError(
                f"layer {self.layer_name!r} has seeds 0..{self.num_seeds - 1}; got {seed_idx!r}"
            )
        return seed_idx

    def transition(self, seed_idx: int, target: Stage) -> None:
        check_transition(self.stages[seed_idx], target, where=f"{self.layer_name}[{seed_idx}]")
        self.stages[seed_idx] = target
        self.seed_stage[seed_idx] = int(target)
        if target is Stage.FOSSILIZED:
            self.set_alpha(seed_idx, 1.0)
        self.refresh()

    def set_alpha(self, seed_idx: int, alpha: float) -> None:
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be within [0, 1], got {alpha}")
        self.alphas[seed_idx] = alpha
        self.seed_alpha[seed_idx] = alpha

    def graft(self, seed_idx: int, module: nn.Module, *, kernel_id: str, graft: str) -> None:
        """Install a loaded kernel in a LOADING seed and start it TRAINING."""
        if self.stages[seed_idx] is not Stage.LOADING:
            raise ValueError(
                f"{self.layer_name}[{seed_idx}] is {self.stages[seed_idx].name}; a kernel is "
                "grafted into a LOADING seed"
            )
        self.put_seed(seed_idx, module)
        self.kernel_ids[seed_idx] = kernel_id
        self.seed_kernel_id[seed_idx] = kernel_id_to_tensor(kernel_id).to(
            self.seed_kernel_id.device
        )
        self.grafts[seed_idx] = graft
        self.seed_graft[seed_idx] = GRAFT_CODES.index(graft)
        self.seed_fallback[seed_idx] = False
        self.set_alpha(seed_idx, 0.0)
        self.transition(seed_idx, Stage.TRAINING)

    def put_seed(self, seed_idx: int, module: nn.Module) -> None:
        """Set seed `seed_idx`'s module, keeping `seeds` in index order, so parameters and
        state-dict keys come seed 0 first whichever seed was grafted first (and match a
        model restored from a checkpoint)."""
        self.seeds[str(seed_idx)] = module
        if list(self.seeds) != sorted(self.seeds, key=int):
            modules = sorted(self.seeds.items(), key=lambda item: int(item[0]))
            self.seeds.clear()
            self.seeds.update(modules)

    def remove_seed(self, seed_idx: int) -> None:
        """Drop the seed module: the layer's output is the host's again, exactly."""
        if str(seed_idx) in self.seeds:
            del self.seeds[str(seed_idx)]
        self.set_alpha(seed_idx, 0.0)
        self.refresh()

    def reset_seed(self, seed_idx: int) -> None:
        """Forget the kernel (EMBARGOED → DORMANT)."""
        self.kernel_ids[seed_idx] = None
        self.grafts[seed_idx] = None
        self.seed_kernel_id[seed_idx] = 0
        self.seed_fallback[seed_idx] = False

    def record_error(self, seed_idx: int) -> int:
        self.error_counts[seed_idx] += 1
        self.seed_error_count[seed_idx] = self.error_counts[seed_idx]
        return self.error_counts[seed_idx]

    def sync_mirror(self) -> None:
        """Rebuild the host-side mirror from the buffers (after `load_state_dict`)."""
        self.stages = [Stage(int(v)) for v in self.seed_stage.tolist()]
        self.alphas = [float(v) for v in self.seed_alpha.tolist()]
        self.kernel_ids = [kernel_id_from_tensor(row) for row in self.seed_kernel_id]
        self.grafts = [
            None if k is None else GRAFT_CODES[g]
            for k, g in zip(self.kernel_ids, self.seed_graft.tolist(), strict=True)
        ]
        self.error_counts = [int(v) for v in self.seed_error_count.tolist()]
        self.latency_us = [float(v) for v in self.seed_latency_us.tolist()]
        self.refresh()

    def flush_latency(self) -> None:
        """Fold latencies measured on sampled forwards into an EMA (mirror and buffer)."""
        if not self._latency_pending:
            return
        for i, us in self._latency_pending:
            prev = self.latency_us[i]
            self.latency_us[i] = us if prev == 0.0 else 0.8 * prev + 0.2 * us
            self.seed_latency_us[i] = self.latency_us[i]
        self._latency_pending.clear()

    def extra_repr(self) -> str:
        sig = self.signature
        return (
            f"{self.layer_name!r}, {sig['layout']} {sig['in']}→{sig['out']}, seeds={self.num_seeds}"
        )
