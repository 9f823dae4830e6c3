"""Tamiyo's policies: where to grow, and with which blueprint.

Action space, for a graph with N seed sites and a catalogue of K blueprint descriptors
(``{"id", "name", "graft": "residual"|"parallel", "layout": "features"|"channels",
"params_estimate"?: int}``): ``WAIT`` or ``GERMINATE(node n, blueprint k)``, flattened as
index 0 = wait and ``1 + n·K + k``. Every policy exposes the full distribution over that
space (`ActionDistribution`, illegal actions at ``-inf``) so the log-probability of any action
is exact, which off-policy training and evaluation need.

Masks (`action_mask`): a seed site is growable only if its seed is DORMANT and, with
``one_per_layer`` (default), no seed of its layer is in flight (`IN_FLIGHT_STAGES`:
GERMINATED..PROBATION and ERROR_RECOVERY); a blueprint fits a site only if its layout is the
layer's layout, and ``parallel`` grafts only fit ``features`` layers (the runtime hosts the
features layout on nn.Linear only). WAIT is always legal.

Policies: `GNNPolicy` (learned), `HeuristicPolicy` (gradient pressure at a loss plateau),
`RandomPolicy` (uniform over legal actions); build them by name with `create_policy`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import GATv2Conv, SAGEConv, global_max_pool, global_mean_pool

from tamiyo.graph import (
    EDGE_FEATURES,
    FEATURE_VERSION,
    GLOBAL_FEATURES,
    GRAFTS,
    LAYOUTS,
    NODE_FEATURES,
    STAGES,
)

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

NAME_BUCKETS = 1024
MAX_BLUEPRINTS = 256
BLUEPRINT_FEATURES = (
    "graft_residual",
    "graft_parallel",
    "layout_features",
    "layout_channels",
    "log_params_estimate",
    "params_estimate_missing",
)
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


def name_bucket(name: str, buckets: int = NAME_BUCKETS) -> int:
    """A stable (process-independent) bucket for a blueprint name: sha256, not ``hash()``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % buckets


def action_mask(data: Data, blueprints: Sequence[dict], *, one_per_layer: bool = True) -> Tensor:
    """Legal GERMINATE actions as a bool [N, K] tensor (WAIT is always legal)."""
    growable = data.node_stage == _DORMANT
    if one_per_layer:
        growable = growable & ~data.node_busy
    layout = data.node_dims[:, 2]
    bp_layout, parallel = _catalogue_codes(blueprints)
    fits = (layout[:, None] == bp_layout[None, :]) & ~(
        parallel[None, :] & (layout != _FEATURES)[:, None]
    )
    return growable[:, None] & fits


def _catalogue_codes(blueprints: Sequence[dict]) -> tuple[Tensor, Tensor]:
    layouts = [LAYOUTS.index(b["layout"]) for b in blueprints]
    parallel = [b["graft"] == "parallel" for b in blueprints]
    return torch.tensor(layouts, dtype=torch.long), torch.tensor(parallel, dtype=torch.bool)


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

    def distribution(self, data: Data, blueprints: Sequence[dict]) -> ActionDistribution: ...

    def decide(
        self, data: Data, blueprints: Sequence[dict], *, rng: torch.Generator, greedy: bool = False
    ) -> Decision: ...


class _Decides:
    """`decide` for any policy that can produce its `ActionDistribution`."""

    name: str

    def distribution(self, data: Data, blueprints: Sequence[dict]) -> ActionDistribution:
        raise NotImplementedError

    @torch.no_grad()
    def decide(
        self, data: Data, blueprints: Sequence[dict], *, rng: torch.Generator, greedy: bool = False
    ) -> Decision:
        """Sample (or, ``greedy``, take the most likely) legal action."""
        dist = self.distribution(data, blueprints)
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

    def distribution(self, data: Data, blueprints: Sequence[dict]) -> ActionDistribution:
        bps = validate_blueprints(blueprints)
        mask = action_mask(data, bps, one_per_layer=self.one_per_layer)
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
    """Grow where the gradient pushes hardest once the loss has plateaued; otherwise wait.

    Pressure of a layer = grad_norm / mean grad_norm over layers (1 when unknown) +
    ``dead_weight`` · dead fraction. GERMINATE is on the table only when
    ``|loss_trend| <= plateau_tol``, budget_used < 1, and the layer's gradient ratio is at
    least ``grad_ratio`` or its dead fraction at least ``dead_threshold``. Scores: WAIT 0.5;
    GERMINATE(n, k) = pressure(n) − 0.25 · rank of k among n's legal blueprints by
    ``params_estimate`` (smallest first, unknown last). Greedy picks the top score (the
    rule: highest pressure, smallest fitting blueprint); sampling draws from
    softmax(score / temperature), which keeps logprob exact; temperature 0 makes the policy
    deterministic (the chosen action has logprob 0).
    """

    name = "heuristic"

    def __init__(
        self,
        *,
        temperature: float = 0.25,
        plateau_tol: float = 0.01,
        grad_ratio: float = 1.0,
        dead_threshold: float = 0.3,
        dead_weight: float = 2.0,
        one_per_layer: bool = True,
    ):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.temperature = temperature
        self.plateau_tol = plateau_tol
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
        size = [math.inf if b["params_estimate"] is None else b["params_estimate"] for b in bps]
        for n in torch.nonzero(candidate & mask.any(1)).flatten().tolist():
            legal = torch.nonzero(mask[n]).flatten().tolist()
            for rank, k in enumerate(sorted(legal, key=lambda k: (size[k], k))):
                scores[n, k] = pressure[n] - 0.25 * rank
        return scores

    def distribution(self, data: Data, blueprints: Sequence[dict]) -> ActionDistribution:
        bps = validate_blueprints(blueprints)
        mask = action_mask(data, bps, one_per_layer=self.one_per_layer)
        scores = _flat_logits(torch.tensor(0.5), self._scores(data, bps, mask), mask)
        if self.temperature == 0:
            logits = torch.full_like(scores, -math.inf)
            logits[int(torch.argmax(scores))] = 0.0
        else:
            logits = scores / self.temperature
        layers, seeds = _site_lists(data)
        return ActionDistribution(logits, layers, seeds, len(bps))


def _blueprint_tensors(bps: list[dict], buckets: int) -> tuple[Tensor, Tensor]:
    rows = [
        [
            float(b["graft"] == "residual"),
            float(b["graft"] == "parallel"),
            float(b["layout"] == "features"),
            float(b["layout"] == "channels"),
            0.0 if b["params_estimate"] is None else math.log1p(b["params_estimate"]) / 10.0,
            float(b["params_estimate"] is None),
        ]
        for b in bps
    ]
    feats = torch.tensor(rows, dtype=torch.float32).reshape(len(bps), len(BLUEPRINT_FEATURES))
    names = torch.tensor([name_bucket(b["name"], buckets) for b in bps], dtype=torch.long)
    return feats, names


@dataclass
class _Scored:
    """Per-graph WAIT logits and values, and the logits of every legal pair of a batch."""

    wait: Tensor  # [B]
    value: Tensor  # [B]
    pairs: list[Tensor]  # per graph: [P_i, 2] legal (node, blueprint) pairs
    pair_logits: Tensor  # [sum P_i], graph by graph in `pairs` order
    segment: Tensor  # [sum P_i] graph index of each pair logit


class GNNPolicy(nn.Module, _Decides):
    """Message passing over seed sites with graph globals mixed in; one exact softmax over
    ``[wait] + legal (node, blueprint)`` whose logits are a WAIT head on the pooled graph,
    a per-node grow head plus a node × blueprint head (blueprint embedding = descriptor
    features + a learned per-name embedding keyed by `name_bucket`, so new catalogue entries
    still work). A value head estimates the expected reward of the state."""

    name = "gnn"

    def __init__(
        self,
        *,
        hidden: int = 64,
        layers: int = 2,
        conv: str = "gatv2",
        heads: int = 2,
        name_buckets: int = NAME_BUCKETS,
        one_per_layer: bool = True,
    ):
        super().__init__()
        if conv not in ("gatv2", "sage"):
            raise ValueError(f"conv must be 'gatv2' or 'sage', got {conv!r}")
        if not 1 <= layers <= 4:
            raise ValueError(f"layers must be in 1..4, got {layers}")
        self._config = {
            "hidden": hidden,
            "layers": layers,
            "conv": conv,
            "heads": heads,
            "name_buckets": name_buckets,
            "one_per_layer": one_per_layer,
        }
        h = hidden
        self.node_in = nn.Linear(len(NODE_FEATURES), h)
        self.glob_in = nn.Linear(len(GLOBAL_FEATURES), h)
        if conv == "sage":
            self.convs = nn.ModuleList(SAGEConv(h, h) for _ in range(layers))
        else:
            self.convs = nn.ModuleList(
                GATv2Conv(h, h, heads=heads, concat=False, edge_dim=len(EDGE_FEATURES))
                for _ in range(layers)
            )
        self.norms = nn.ModuleList(nn.LayerNorm(h) for _ in range(layers))
        self.graph_mlp = nn.Sequential(nn.Linear(3 * h, h), nn.ReLU())
        self.wait_head = nn.Linear(h, 1)
        self.value_head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))
        self.grow_head = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(), nn.Linear(h, 1))
        self.bp_in = nn.Linear(len(BLUEPRINT_FEATURES), h)
        self.bp_name = nn.Embedding(name_buckets, h)
        nn.init.normal_(self.bp_name.weight, std=0.02)
        self.pair_node = nn.Linear(h, h)
        self.pair_bp = nn.Linear(h, h)
        self.pair_out = nn.Linear(h, 1)

    def config(self) -> dict:
        """Constructor arguments plus the feature layout the weights were trained on."""
        return {
            **self._config,
            "feature_version": FEATURE_VERSION,
            "node_features": len(NODE_FEATURES),
            "global_features": len(GLOBAL_FEATURES),
        }

    def _score(self, datas: Sequence[Data], catalogues: Sequence[list[dict]]) -> _Scored:
        batch = Batch.from_data_list(list(datas))
        vec = batch.batch
        u = self.glob_in(batch.u)
        h = torch.relu(self.node_in(batch.x) + u[vec])
        for conv, norm in zip(self.convs, self.norms, strict=True):
            if self._config["conv"] == "gatv2":
                out = conv(h, batch.edge_index, batch.edge_attr)
            else:
                out = conv(h, batch.edge_index)
            h = norm(h + torch.relu(out))
        g = self.graph_mlp(torch.cat([global_mean_pool(h, vec), global_max_pool(h, vec), u], 1))
        grow = self.grow_head(torch.cat([h, g[vec]], 1))[:, 0]
        offsets: dict[tuple, int] = {}
        unique: list[dict] = []
        pairs, node_idx, bp_idx, segment = [], [], [], []
        ptr = batch.ptr.tolist()
        for i, (data, bps) in enumerate(zip(datas, catalogues, strict=True)):
            key = tuple((b["name"], b["graft"], b["layout"], b["params_estimate"]) for b in bps)
            if key not in offsets:
                offsets[key] = len(unique)
                unique.extend(bps)
            legal = torch.nonzero(
                action_mask(data, bps, one_per_layer=self._config["one_per_layer"])
            )
            pairs.append(legal)
            node_idx.append(legal[:, 0] + ptr[i])
            bp_idx.append(legal[:, 1] + offsets[key])
            segment.append(torch.full((len(legal),), i, dtype=torch.long))
        feats, names = _blueprint_tensors(unique, self._config["name_buckets"])
        bp = self.pair_bp(self.bp_in(feats) + self.bp_name(names))
        nodes, bp_rows = torch.cat(node_idx), torch.cat(bp_idx)
        pair = self.pair_out(torch.tanh(self.pair_node(h)[nodes] + bp[bp_rows]))[:, 0]
        return _Scored(
            wait=self.wait_head(g)[:, 0],
            value=self.value_head(g)[:, 0],
            pairs=pairs,
            pair_logits=pair + grow[nodes],
            segment=torch.cat(segment),
        )

    def distributions(
        self, datas: Sequence[Data], blueprints: Sequence[Sequence[dict]]
    ) -> list[ActionDistribution]:
        """One batched forward pass; one (differentiable) distribution per graph."""
        if len(datas) != len(blueprints):
            raise ValueError(f"got {len(datas)} graphs but {len(blueprints)} blueprint lists")
        catalogues = [validate_blueprints(b) for b in blueprints]
        s = self._score(datas, catalogues)
        out, start = [], 0
        for i, (data, bps) in enumerate(zip(datas, catalogues, strict=True)):
            legal, k = s.pairs[i], len(bps)
            flat = torch.full((data.num_nodes * k,), -math.inf).index_put(
                (legal[:, 0] * k + legal[:, 1],), s.pair_logits[start : start + len(legal)]
            )
            flat = torch.cat([s.wait[i : i + 1], flat])
            start += len(legal)
            out.append(ActionDistribution(flat, *_site_lists(data), k, s.value[i]))
        return out

    def distribution(self, data: Data, blueprints: Sequence[dict]) -> ActionDistribution:
        return self.distributions([data], [blueprints])[0]

    def evaluate(
        self,
        datas: Sequence[Data] | Batch,
        blueprints: Sequence[Sequence[dict]] | Sequence[dict],
        actions: Sequence[Mapping],
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(log π(action), entropy, value) per graph, differentiable; illegal actions get -inf.

        ``datas`` is a list of graphs or a PyG `Batch`; ``blueprints`` one catalogue per graph
        or a single catalogue shared by all. Vectorised over the batch: a segment log-softmax
        over each graph's ``[wait] + legal pairs``, the same as `distribution().log_prob`.
        """
        if isinstance(datas, Batch):
            datas = datas.to_data_list()
        if blueprints and isinstance(blueprints[0], Mapping):
            blueprints = [blueprints] * len(datas)
        if not len(datas) == len(blueprints) == len(actions):
            raise ValueError("evaluate needs as many blueprint lists and actions as graphs")
        catalogues = [validate_blueprints(b) for b in blueprints]
        s = self._score(datas, catalogues)
        b = len(datas)
        logits = torch.cat([s.wait, s.pair_logits])
        seg = torch.cat([torch.arange(b), s.segment])
        top = torch.full((b,), -math.inf).scatter_reduce(0, seg, logits.detach(), "amax")
        total = torch.zeros(b).index_add(0, seg, torch.exp(logits - top[seg]))
        logp = logits - (top + torch.log(total))[seg]
        entropy = -torch.zeros(b).index_add(0, seg, logp.exp() * logp)
        chosen, start = [], b
        for i, (data, bps, action) in enumerate(zip(datas, catalogues, actions, strict=True)):
            legal = s.pairs[i]
            index = _action_index(action, *_site_lists(data), len(bps))
            if index == 0:
                chosen.append(i)
            elif index is not None:
                n, k = divmod(index - 1, len(bps))
                hit = torch.nonzero((legal[:, 0] == n) & (legal[:, 1] == k)).flatten()
                chosen.append(start + int(hit[0]) if len(hit) else -1)
            else:
                chosen.append(-1)
            start += len(legal)
        padded = torch.cat([logp, logp.new_tensor([-math.inf])])
        return padded[torch.tensor(chosen)], entropy, s.value

    def save_safetensors(self) -> bytes:
        """The weights as safetensors bytes (no pickle); pair with `config()`."""
        return st_save({k: v.detach().contiguous().clone() for k, v in self.state_dict().items()})

    @classmethod
    def load_safetensors(cls, data: bytes, config: Mapping) -> GNNPolicy:
        """Rebuild a policy from `save_safetensors` bytes and its `config()`."""
        cfg = dict(config)
        version = cfg.pop("feature_version", FEATURE_VERSION)
        if version != FEATURE_VERSION:
            raise ValueError(
                f"checkpoint uses graph features v{version}, this code v{FEATURE_VERSION}: "
                "train a new policy version on current experiences"
            )
        for key, want in (
            ("node_features", len(NODE_FEATURES)),
            ("global_features", len(GLOBAL_FEATURES)),
        ):
            if cfg.pop(key, want) != want:
                raise ValueError(f"checkpoint {key} differ from this code's; retrain the policy")
        try:
            policy = cls(**cfg)
            policy.load_state_dict(st_load(bytes(data)))
        except (TypeError, RuntimeError) as exc:
            raise ValueError(
                f"checkpoint does not match its config ({exc}); save both from the same policy"
            ) from exc
        return policy


POLICIES = {"gnn": GNNPolicy, "heuristic": HeuristicPolicy, "random": RandomPolicy}


def create_policy(name: str, **kwargs: Any) -> Policy:
    """Build a policy by registered name (``gnn``, ``heuristic``, ``random``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**kwargs)
