"""Tamiyo's policies: where to grow, and with which blueprint.

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

Policies: `GNNPolicy` (learned; defined in `tamiyo._gnn`), `HeuristicPolicy` (gradient
pressure at a loss plateau), `RandomPolicy` (uniform over legal actions); build them by name
with `create_policy`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch_geometric.data import Data

from tamiyo.graph import GLOBAL_FEATURES, GRAFTS, LAYOUTS, NODE_FEATURES, STAGES

__all__ = [
    "BLUEPRINT_FEATURES",
    "ActionDistribution",
    "Decision",
    "GNNPolicy",
    "HeuristicPolicy",
    "NAME_BUCKETS",
    "POLICIES",
    "Policy",
    "RandomPolicy",
    "action_mask",
    "create_policy",
    "name_bucket",
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


def _check_fits(fits: object, num_nodes: int, num_blueprints: int, where: str = "fits") -> None:
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
        _check_fits(fits, data.num_nodes, len(blueprints))
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


def _action_index(
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
        return _action_index(action, self.node_layer, self.node_seed, self.num_blueprints)

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


class _Decides:
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


def _site_lists(data: Data) -> tuple[list[str], list[int]]:
    return list(data.node_layer), data.node_seed.tolist()


def _flat_logits(wait: Tensor, pairs: Tensor, mask: Tensor) -> Tensor:
    return torch.cat([wait.reshape(1), pairs.masked_fill(~mask, -math.inf).reshape(-1)])


class RandomPolicy(_Decides):
    """WAIT with probability ``p_wait``, otherwise uniform over the legal GERMINATE actions."""

    name = "random"

    def __init__(self, *, p_wait: float = 0.5, one_per_layer: bool = True):
        if not 0.0 <= p_wait <= 1.0:
            raise ValueError(f"p_wait must be in [0, 1], got {p_wait}")
        self.p_wait, self.one_per_layer = p_wait, one_per_layer

    def distribution(
        self, data: Data, blueprints: Sequence[dict], *, fits: Tensor | None = None
    ) -> ActionDistribution:
        bps = validate_blueprints(blueprints)
        mask = action_mask(data, bps, one_per_layer=self.one_per_layer, fits=fits)
        legal = int(mask.sum())
        if legal == 0 or self.p_wait == 1.0:
            wait, grow = 0.0, -math.inf
        else:
            wait = math.log(self.p_wait) if self.p_wait > 0 else -math.inf
            grow = math.log((1.0 - self.p_wait) / legal)
        pairs = torch.full(mask.shape, grow)
        layers, seeds = _site_lists(data)
        return ActionDistribution(
            _flat_logits(torch.tensor(wait), pairs, mask), layers, seeds, len(bps)
        )


class HeuristicPolicy(_Decides):
    """Grow where the gradient pushes hardest once the loss stops falling fast; otherwise wait.

    Pressure of a layer = grad_norm / mean grad_norm over layers (1 when unknown) +
    ``dead_weight`` · dead fraction. GERMINATE is on the table only when
    ``|loss_trend| <= plateau_tol`` (the loss EMA moved by at most 10 % over the last
    decision interval: the steep first descent is over), budget_used < 1, and the layer's
    gradient ratio is at least ``grad_ratio`` or its dead fraction at least
    ``dead_threshold``. A bridge blueprint widens the hidden layer between its site and
    the site's bridge source, so it is on the table when either layer qualifies, at the
    higher of the two pressures. (The threshold was 2 %, a true plateau; capacity added
    that late has fewer steps to train, and benchmarks/growth_timing.py measures what that
    costs a too-small model: 8 hidden units added at epoch 3 of 40 end 0.36 points above
    the same units added at epoch 16.)

    Scores: WAIT 0.5; GERMINATE(n, k) = pressure − ``rank_step`` · rank of k among n's legal
    blueprints, bridges first and ``rank_step`` higher (new hidden units are the one thing a
    residual or parallel seed of a narrow layer cannot add, so at equal pressure a bridge
    also outranks its source layer's own seeds), then by ``params_estimate`` (largest
    first, unknown last). Greedy picks the top score (the rule: highest pressure, the
    largest blueprint that fits -- with a ``param_budget`` the server's ``fits`` mask holds
    only kernels within what is left of it, so the rule spends the budget where the
    pressure is; the Controller's default budget is the model's own size, and a run without
    one may get any kernel the compiler accepts); sampling draws from
    softmax(score / temperature), which keeps logprob exact; temperature 0 makes the policy
    deterministic (the chosen action has logprob 0).
    """

    name = "heuristic"

    def __init__(
        self,
        *,
        temperature: float = 0.25,
        rank_step: float = 0.5,
        plateau_tol: float = 0.10,
        grad_ratio: float = 1.0,
        dead_threshold: float = 0.3,
        dead_weight: float = 2.0,
        one_per_layer: bool = True,
    ):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.temperature = temperature
        self.plateau_tol = plateau_tol
        self.rank_step = rank_step
        self.grad_ratio = grad_ratio
        self.dead_threshold = dead_threshold
        self.dead_weight = dead_weight
        self.one_per_layer = one_per_layer

    def _scores(self, data: Data, bps: list[dict], mask: Tensor) -> Tensor:
        x, u = data.x, data.u[0]
        g = GLOBAL_FEATURES.index
        trend = u[g("loss_trend")]
        trend = torch.sign(trend) * torch.expm1(trend.abs()) / 100.0
        plateau = u[g("loss_trend_missing")] == 0 and float(trend.abs()) <= self.plateau_tol
        scores = torch.full(mask.shape, -math.inf)
        if not plateau or float(u[g("budget_used")]) >= 1.0 or not mask.any():
            return scores
        f = NODE_FEATURES.index
        known = x[:, f("grad_missing")] == 0
        grad = torch.expm1(x[:, f("log_grad_norm")])
        per_layer = known & (data.node_seed == 0)
        mean = grad[per_layer].mean() if per_layer.any() else torch.tensor(0.0)
        ratio = torch.where(known & (mean > 0), grad / mean.clamp_min(1e-12), torch.ones_like(grad))
        dead = x[:, f("act_dead_fraction")]
        pressure = ratio + self.dead_weight * dead
        candidate = (ratio >= self.grad_ratio) | (dead >= self.dead_threshold)
        # A bridge site also answers for its source layer (any one of that layer's seed nodes).
        src_pos = data.node_bridge_pos
        first_node = {int(p): n for n, p in reversed(list(enumerate(data.node_layer_pos)))}
        src = [first_node.get(int(p), n) for n, p in enumerate(src_pos)]
        pair_pressure = torch.maximum(pressure, pressure[src])
        pair_candidate = candidate | candidate[src]
        size = [-math.inf if b["params_estimate"] is None else b["params_estimate"] for b in bps]
        bridge = [b["graft"] == "bridge" for b in bps]
        for n in torch.nonzero(pair_candidate & mask.any(1)).flatten().tolist():
            legal = torch.nonzero(mask[n]).flatten().tolist()
            ranked = sorted(legal, key=lambda k: (not bridge[k], -size[k], k))
            for rank, k in enumerate(ranked):
                if bridge[k]:
                    scores[n, k] = pair_pressure[n] + self.rank_step * (1 - rank)
                elif candidate[n]:
                    scores[n, k] = pressure[n] - self.rank_step * rank
        return scores

    def distribution(
        self, data: Data, blueprints: Sequence[dict], *, fits: Tensor | None = None
    ) -> ActionDistribution:
        bps = validate_blueprints(blueprints)
        mask = action_mask(data, bps, one_per_layer=self.one_per_layer, fits=fits)
        scores = _flat_logits(torch.tensor(0.5), self._scores(data, bps, mask), mask)
        if self.temperature == 0:
            logits = torch.full_like(scores, -math.inf)
            logits[int(torch.argmax(scores))] = 0.0
        else:
            logits = scores / self.temperature
        layers, seeds = _site_lists(data)
        return ActionDistribution(logits, layers, seeds, len(bps))


# The GNN reuses the action space above, so it is imported once that is defined.
from tamiyo._gnn import BLUEPRINT_FEATURES, NAME_BUCKETS, GNNPolicy, name_bucket  # noqa: E402

POLICIES = {"gnn": GNNPolicy, "heuristic": HeuristicPolicy, "random": RandomPolicy}


def create_policy(name: str, **kwargs: Any) -> Policy:
    """Build a policy by registered name (``gnn``, ``heuristic``, ``random``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**kwargs)
