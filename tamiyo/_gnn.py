"""`GNNPolicy`: Tamiyo's learned policy, a message-passing network over seed sites.

It shares the action space, masks and `ActionDistribution` of `tamiyo._actions` with the
other policies; `tamiyo.policy` re-exports everything public here, so import it from there.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import GATv2Conv, SAGEConv, global_max_pool, global_mean_pool

from tamiyo._actions import (
    ActionDistribution,
    Decides,
    action_index,
    action_mask,
    check_fits,
    site_lists,
    validate_blueprints,
)
from tamiyo.graph import EDGE_FEATURES, FEATURE_VERSION, GLOBAL_FEATURES, NODE_FEATURES

__all__ = ["BLUEPRINT_FEATURES", "GNNPolicy", "NAME_BUCKETS", "name_bucket"]

NAME_BUCKETS = 1024
BLUEPRINT_FEATURES = (
    "graft_residual",
    "graft_parallel",
    "graft_bridge",
    "layout_features",
    "layout_channels",
    "log_params_estimate",
    "params_estimate_missing",
)


def name_bucket(name: str, buckets: int = NAME_BUCKETS) -> int:
    """A stable (process-independent) bucket for a blueprint name: sha256, not ``hash()``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % buckets


def _per_graph_fits(fits: object, count: int) -> list[Tensor | None]:
    """One optional feasibility mask per graph (None: no server-side restriction)."""
    if fits is None:
        return [None] * count
    if isinstance(fits, Tensor) or not isinstance(fits, Sequence) or len(fits) != count:
        raise ValueError(
            f"fits: expected a list of {count} masks (one [num_nodes, num_blueprints] bool "
            "tensor or None per graph)"
        )
    return list(fits)


def _blueprint_tensors(bps: list[dict], buckets: int) -> tuple[Tensor, Tensor]:
    rows = [
        [
            float(b["graft"] == "residual"),
            float(b["graft"] == "parallel"),
            float(b["graft"] == "bridge"),
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


class GNNPolicy(nn.Module, Decides):
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

    def _score(
        self,
        datas: Sequence[Data],
        catalogues: Sequence[list[dict]],
        fits: Sequence[Tensor | None],
    ) -> _Scored:
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
        for i, (data, bps, ok) in enumerate(zip(datas, catalogues, fits, strict=True)):
            key = tuple((b["name"], b["graft"], b["layout"], b["params_estimate"]) for b in bps)
            if key not in offsets:
                offsets[key] = len(unique)
                unique.extend(bps)
            legal = torch.nonzero(
                action_mask(data, bps, one_per_layer=self._config["one_per_layer"], fits=ok)
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

    def _inputs(
        self, datas: Sequence[Data], blueprints: Sequence[Sequence[dict]], fits: object
    ) -> tuple[list[list[dict]], list[Tensor | None]]:
        catalogues = [validate_blueprints(b) for b in blueprints]
        masks = _per_graph_fits(fits, len(datas))
        for i, (data, bps, ok) in enumerate(zip(datas, catalogues, masks, strict=True)):
            if ok is not None:
                check_fits(ok, data.num_nodes, len(bps), f"fits[{i}]")
        return catalogues, masks

    def distributions(
        self,
        datas: Sequence[Data],
        blueprints: Sequence[Sequence[dict]],
        *,
        fits: Sequence[Tensor | None] | None = None,
    ) -> list[ActionDistribution]:
        """One batched forward pass; one (differentiable) distribution per graph, with
        ``fits`` an optional feasibility mask per graph."""
        if len(datas) != len(blueprints):
            raise ValueError(f"got {len(datas)} graphs but {len(blueprints)} blueprint lists")
        catalogues, masks = self._inputs(datas, blueprints, fits)
        s = self._score(datas, catalogues, masks)
        out, start = [], 0
        for i, (data, bps) in enumerate(zip(datas, catalogues, strict=True)):
            legal, k = s.pairs[i], len(bps)
            flat = torch.full((data.num_nodes * k,), -math.inf).index_put(
                (legal[:, 0] * k + legal[:, 1],), s.pair_logits[start : start + len(legal)]
            )
            flat = torch.cat([s.wait[i : i + 1], flat])
            start += len(legal)
            out.append(ActionDistribution(flat, *site_lists(data), k, s.value[i]))
        return out

    def distribution(
        self, data: Data, blueprints: Sequence[dict], *, fits: Tensor | None = None
    ) -> ActionDistribution:
        if fits is not None:
            check_fits(fits, data.num_nodes, len(blueprints))
        return self.distributions([data], [blueprints], fits=[fits])[0]

    def evaluate(
        self,
        datas: Sequence[Data] | Batch,
        blueprints: Sequence[Sequence[dict]] | Sequence[dict],
        actions: Sequence[Mapping],
        *,
        fits: Sequence[Tensor | None] | None = None,
        full: bool = False,
    ) -> tuple[Tensor, ...]:
        """(log π(action), entropy, value) per graph, differentiable; illegal actions get -inf.

        ``datas`` is a list of graphs or a PyG `Batch`; ``blueprints`` one catalogue per graph
        or a single catalogue shared by all; ``fits`` an optional feasibility mask per graph.
        Vectorised over the batch: a segment log-softmax over each graph's ``[wait] + legal
        pairs``, the same as `distribution().log_prob`. With ``full``, also every legal
        action's log-probability and its graph index, laid out as every graph's WAIT first,
        then each graph's legal (node, blueprint) pairs in row-major order.
        """
        if isinstance(datas, Batch):
            datas = datas.to_data_list()
        if blueprints and isinstance(blueprints[0], Mapping):
            blueprints = [blueprints] * len(datas)
        if not len(datas) == len(blueprints) == len(actions):
            raise ValueError("evaluate needs as many blueprint lists and actions as graphs")
        catalogues, masks = self._inputs(datas, blueprints, fits)
        s = self._score(datas, catalogues, masks)
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
            index = action_index(action, *site_lists(data), len(bps))
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
        if full:
            return padded[torch.tensor(chosen)], entropy, s.value, logp, seg
        return padded[torch.tensor(chosen)], entropy, s.value

    def save_safetensors(self) -> bytes:
        """The weights as safetensors bytes (no pickle); pair with `config()`."""
        return st_save({k: v.detach().contiguous().clone() for k, v in self.state_dict().items()})

    @classmethod
    def load_safetensors(cls, data: bytes, config: Mapping) -> GNNPolicy:
        """Rebuild a policy from `save_safetensors` bytes and its `config()`; a `ValueError`
        for anything that is not such a pair."""
        if not isinstance(config, Mapping):
            raise ValueError(f"policy config must be an object, got {type(config).__name__}")
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
            state = st_load(bytes(data))
        except SafetensorError as exc:
            raise ValueError(f"checkpoint is not a safetensors file ({exc})") from exc
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"checkpoint or config unreadable ({exc})") from exc
        try:
            policy.load_state_dict(state)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(
                f"checkpoint does not match its config ({exc}); save both from the same policy"
            ) from exc
        bad = policy.non_finite_parameters()
        if bad:
            raise ValueError(
                f"checkpoint holds non-finite weights ({', '.join(bad[:5])}); the training that "
                "made it diverged: train a new policy version"
            )
        return policy

    def non_finite_parameters(self) -> list[str]:
        """Names of the parameters and buffers holding NaN or infinity (none for a usable
        policy)."""
        return [
            name
            for name, tensor in self.state_dict().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
        ]
