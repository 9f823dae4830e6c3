"""Tamiyo's policies: where to grow, and with which blueprint.

Policies: `GNNPolicy` (learned; defined in `tamiyo._gnn`), `HeuristicPolicy` (gradient
pressure at a loss plateau), `RandomPolicy` (uniform over legal actions); build them by name
with `create_policy`. They share one action space (`tamiyo._actions`: WAIT or
GERMINATE(seed site, blueprint), its masks and `ActionDistribution`), re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch_geometric.data import Data

from tamiyo._actions import (
    ActionDistribution,
    Decides,
    Decision,
    Policy,
    action_mask,
    site_lists,
    validate_blueprints,
)
from tamiyo._gnn import BLUEPRINT_FEATURES, NAME_BUCKETS, GNNPolicy, name_bucket
from tamiyo.graph import GLOBAL_FEATURES, NODE_FEATURES

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


def _flat_logits(wait: Tensor, pairs: Tensor, mask: Tensor) -> Tensor:
    return torch.cat([wait.reshape(1), pairs.masked_fill(~mask, -math.inf).reshape(-1)])


class RandomPolicy(Decides):
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
        layers, seeds = site_lists(data)
        return ActionDistribution(
            _flat_logits(torch.tensor(wait), pairs, mask), layers, seeds, len(bps)
        )


class HeuristicPolicy(Decides):
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
        layers, seeds = site_lists(data)
        return ActionDistribution(logits, layers, seeds, len(bps))


POLICIES = {"gnn": GNNPolicy, "heuristic": HeuristicPolicy, "random": RandomPolicy}


def create_policy(name: str, **kwargs: Any) -> Policy:
    """Build a policy by registered name (``gnn``, ``heuristic``, ``random``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**kwargs)
