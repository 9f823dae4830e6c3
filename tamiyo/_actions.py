"""Tamiyo's action space, shared by every policy (`tamiyo.policy`, `tamiyo._gnn`).

Action space, for a graph with N seed sites and a catalogue of K blueprint descriptors
(``{"id", "name", "graft": "residual"|"parallel"|"bridge", "layout": "features"|"channels",
"params_estimate"?: int}``): ``WAIT`` or ``GERMINATE(node n, blueprint k)``, flattened as
index 0 = wait and ``1 + n·K + k``. Every policy exposes the full distribution over that
space (`ActionDistribution`, illegal actions at ``-inf``) so the log-probability of any action
is exact, which off-policy training and evaluation need.

Masks (`action_mask`): a seed site is growable only if its seed is DORMANT and, with
``one_per_layer`` (default), no seed of its layer is in flight (`IN_FLIGHT_STAGES`:
GERMINATED..PROBATION and ERROR_RECOVERY); a blueprint fits a site only if its layout is the
layer's layout, ``parallel`` grafts only fit ``features`` layers (the runtime hosts the
features layout on nn.Linear only), and ``bridge`` grafts only fit layers with a bridge
source (``bridge_from`` in the graph). WAIT is always legal. The server may add ``fits``, a bool
[N, K] tensor of the (site, blueprint) pairs it can compile (a blueprint too large at a layer's
width, say), which every mask, distribution and decision ANDs in; a policy cannot know that
itself, and a log-probability is only exact relative to what the behaviour policy could choose.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from torch_geometric.data import Data

from tamiyo.graph import GRAFTS, LAYOUTS, STAGES

__all__ = [
    "MAX_BLUEPRINTS",
    "ActionDistribution",
    "Decides",
    "Decision",
    "Policy",
    "action_index",
    "action_mask",
    "check_fits",
    "site_lists",
    "validate_blueprints",
]

MAX_BLUEPRINTS = 256
_BP_REQUIRED = ("id", "name", "graft", "layout")
_BP_ALLOWED = (*_BP_REQUIRED, "params_estimate")
_DORMANT = STAGES.index("DORMANT")
_FEATURES = LAYOUTS.index("features")


def validate_blueprints(blueprints: object) -> list[dict]:
    """Check a catalogue of blueprint descriptors; errors name ``blueprints[i].field``."""
    if not isinstance(blueprints, Sequence) or len(blueprints) > MAX_BLUEPRINTS:
        raise ValueError(f"blueprints: expected a list of at most {MAX_BLUEPRINTS} descriptors")
    out = []
    for i, bp in enumerate(blueprints):
        where = f"blueprints[{i}]"
        if not isinstance(bp, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(bp).__name__}")
        for key in _BP_REQUIRED:
            if key not in bp:
                raise ValueError(f"{where}.{key}: missing field")
        for key in bp:
            if key not in _BP_ALLOWED:
                raise ValueError(f"{where}.{key}: unknown field; allowed: {', '.join(_BP_ALLOWED)}")
        for key in ("id", "name"):
            if not isinstance(bp[key], str) or not bp[key]:
                raise ValueError(f"{where}.{key}: expected a non-empty string")
        if bp["graft"] not in GRAFTS:
            raise ValueError(f"{where}.graft: expected one of {', '.join(GRAFTS)}")
        if bp["layout"] not in LAYOUTS:
            raise ValueError(f"{where}.layout: expected one of {', '.join(LAYOUTS)}")
        est = bp.get("params_estimate")
        if est is not None and (isinstance(est, bool) or not isinstance(est, int) or est < 0):
            raise ValueError(f"{where}.params_estimate: expected a non-negative integer or null")
        out.append(
            {
                "id": bp["id"],
                "name": bp["name"],
                "graft": bp["graft"],
                "layout": bp["layout"],
                "params_estimate": est,
            }
        )
    return out


def check_fits(fits: object, num_nodes: int, num_blueprints: int, where: str = "fits") -> None:
    want = [num_nodes, num_blueprints]
    if not isinstance(fits, Tensor):
        raise ValueError(
            f"{where}: expected a torch.bool tensor of shape {want} (seed sites × blueprints) "
            f"or None, got {type(fits).__name__}"
        )
    if fits.dtype != torch.bool or list(fits.shape) != want:
        raise ValueError(
            f"{where}: expected a torch.bool tensor of shape {want} (one row per seed site, one "
            f"column per blueprint), got {fits.dtype} of shape {list(fits.shape)}"
        )


def action_mask(
    data: Data,
    blueprints: Sequence[dict],
    *,
    one_per_layer: bool = True,
    fits: Tensor | None = None,
) -> Tensor:
    """Legal GERMINATE actions as a bool [N, K] tensor (WAIT is always legal); ``fits`` is
    the server's feasibility mask, ANDed in."""
    growable = data.node_stage == _DORMANT
    if one_per_layer:
        growable = growable & ~data.node_busy
    layout = data.node_dims[:, 2]
    bridge_site = data.node_dims[:, 3] > 0
    bp_layout, parallel, bridge = _catalogue_codes(blueprints)
    layout_ok = (layout[:, None] == bp_layout[None, :]) & ~(
        parallel[None, :] & (layout != _FEATURES)[:, None]
    )
    mask = growable[:, None] & layout_ok & ~(bridge[None, :] & ~bridge_site[:, None])
    if fits is not None:
        check_fits(fits, data.num_nodes, len(blueprints))
        mask = mask & fits
    return mask


def _catalogue_codes(blueprints: Sequence[dict]) -> tuple[Tensor, Tensor, Tensor]:
    """Per blueprint: layout index, reads the input of a Linear (parallel or bridge), bridge."""
    layouts = [LAYOUTS.index(b["layout"]) for b in blueprints]
    parallel = [b["graft"] in ("parallel", "bridge") for b in blueprints]
    bridge = [b["graft"] == "bridge" for b in blueprints]
    return (
        torch.tensor(layouts, dtype=torch.long),
        torch.tensor(parallel, dtype=torch.bool),
        torch.tensor(bridge, dtype=torch.bool),
    )


@dataclass(frozen=True)
class Decision:
    """A chosen action; ``logprob`` is log π(action | state) under the policy that chose it."""

    action: str  # "wait" | "germinate"
    layer: str | None
    seed: int | None
    blueprint_index: int | None
    logprob: float
    value: float | None
    policy: str

    def as_action(self) -> dict:
        """The experience form: ``{"action", "layer", "seed", "blueprint_index"}``."""
        return {
            "action": self.action,
            "layer": self.layer,
            "seed": self.seed,
            "blueprint_index": self.blueprint_index,
        }


def action_index(
    action: Mapping, node_layer: Sequence[str], node_seed: Sequence[int], num_blueprints: int
) -> int | None:
    if action.get("action") == "wait":
        return 0
    k, seed = action.get("blueprint_index"), action.get("seed")
    if action.get("action") != "germinate" or not isinstance(k, int) or not 0 <= k < num_blueprints:
        return None
    for n, (layer, s) in enumerate(zip(node_layer, node_seed, strict=True)):
        if layer == action.get("layer") and s == seed:
            return 1 + n * num_blueprints + k
    return None


@dataclass
class ActionDistribution:
    """Logits over ``[wait] + [(node, blueprint) for node for blueprint]``; -inf = illegal."""

    logits: Tensor
    node_layer: list[str]
    node_seed: list[int]
    num_blueprints: int
    value: Tensor | None = None

    def log_probs(self) -> Tensor:
        return torch.log_softmax(self.logits, dim=0)

    def entropy(self) -> Tensor:
        logp = self.log_probs()
        return -torch.where(logp.isfinite(), logp.exp() * logp, torch.zeros_like(logp)).sum()

    def index(self, action: Mapping) -> int | None:
        """Flat index of an action dict, or None when it names no seed site or blueprint."""
        return action_index(action, self.node_layer, self.node_seed, self.num_blueprints)

    def log_prob(self, action: Mapping) -> Tensor:
        """Exact log-probability of an action (``-inf`` if illegal or unknown)."""
        i = self.index(action)
        return self.log_probs()[i] if i is not None else self.logits.new_tensor(-math.inf)

    def decision(self, *, rng: torch.Generator, greedy: bool, policy: str) -> Decision:
        logp = self.log_probs().detach()
        if greedy:
            i = int(torch.argmax(logp))
        else:
            i = int(torch.multinomial(logp.exp(), 1, generator=rng))
        value = None if self.value is None else float(self.value)
        if i == 0:
            return Decision("wait", None, None, None, float(logp[0]), value, policy)
        n, k = divmod(i - 1, self.num_blueprints)
        return Decision(
            "germinate", self.node_layer[n], self.node_seed[n], k, float(logp[i]), value, policy
        )


@runtime_checkable
class Policy(Protocol):
    name: str

    def distribution(
        self, data: Data, blueprints: Sequence[dict], *, fits: Tensor | None = None
    ) -> ActionDistribution: ...

    def decide(
        self,
        data: Data,
        blueprints: Sequence[dict],
        *,
        rng: torch.Generator,
        greedy: bool = False,
        fits: Tensor | None = None,
    ) -> Decision: ...


class Decides:
    """`decide` for any policy that can produce its `ActionDistribution`."""

    name: str

    def distribution(
        self, data: Data, blueprints: Sequence[dict], *, fits: Tensor | None = None
    ) -> ActionDistribution:
        raise NotImplementedError

    @torch.no_grad()
    def decide(
        self,
        data: Data,
        blueprints: Sequence[dict],
        *,
        rng: torch.Generator,
        greedy: bool = False,
        fits: Tensor | None = None,
    ) -> Decision:
        """Sample (or, ``greedy``, take the most likely) legal action."""
        dist = self.distribution(data, blueprints, fits=fits)
        return dist.decision(rng=rng, greedy=greedy, policy=self.name)


def site_lists(data: Data) -> tuple[list[str], list[int]]:
    return list(data.node_layer), data.node_seed.tolist()
