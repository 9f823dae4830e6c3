"""Graph features for Tamiyo: validate a runtime graph document and turn it into a PyG graph.

Over 400 lines because the document's schema and the features read from it change together:
a new field is validated and encoded in one change, and `FEATURE_VERSION` follows both.

A graph document (schema ``esper.graph/1``) is ``MorphableModel.health()`` plus training
globals::

    {"schema": "esper.graph/1", "step": 120,
     "layers": [{"name", "type", "layout", "in", "out", "bridge_from"?, "params",
                 "activation": {"mean", "std", "dead_fraction"} | null,
                 "grad_norm": float | null,
                 "seeds": [{"index", "stage", "alpha", "kernel_id", "graft", "latency_us",
                            "health", "errors", "steps_in_stage", "params"}, ...]}, ...],
     "globals": {"progress", "loss", "loss_trend", "val_metric", "val_trend", "budget_used"}}

`validate_graph` is strict: every field listed above must be present (``bridge_from``, the
name of the layer whose input this layer's bridge seeds read, may be left out or null) and
no other; numbers must be finite. ``progress`` and ``budget_used`` are required numbers; ``loss``,
``loss_trend``, ``val_metric`` and ``val_trend`` may be null (no window yet) and get a
"missing" indicator feature.

`to_data` builds one node per *seed site* (layer × seed index) in forward order. Edges follow
the data flow: every seed of layer i links to every seed of layer i+1, once forward and once
backward, and seeds of the same layer link to each other; ``edge_attr`` one-hot encodes
`EDGE_FEATURES`. Scaling: ``log_*`` features are ``log1p`` of a non-negative quantity;
``symlog(v) = sign(v)·log1p(|v|)``; trends are slopes (small numbers), so they are
multiplied by 100 before the symlog. ``depth`` is the layer's position in forward order,
0 (first) to 1 (last).

Bounds: validation only asks numbers to be finite, so a document may hold values such as
``loss_trend = 1e307`` (× 100 overflows to inf) or ``budget_used = 1e38`` (beyond float32).
Every feature is therefore computed in float64 and then clamped to
[-`FEATURE_LIMIT`, `FEATURE_LIMIT`] before it becomes a float32 tensor, so the network only
ever sees finite, bounded inputs. The limit is far above anything a real run produces (a
symlog feature reaches it at |value| ≈ 2.7e43, ``budget_used`` at 100 times the budget), so
features of real documents are unchanged; an absurd value reads as "at the limit".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch_geometric.data import Data

__all__ = [
    "EDGE_FEATURES",
    "FEATURE_LIMIT",
    "FEATURE_VERSION",
    "GLOBAL_FEATURES",
    "GRAFTS",
    "GRAPH_SCHEMA",
    "GraphError",
    "IN_FLIGHT_STAGES",
    "LAYOUTS",
    "MAX_LAYERS",
    "MAX_SEEDS",
    "NODE_FEATURES",
    "STAGES",
    "to_data",
    "validate_graph",
]

GRAPH_SCHEMA = "esper.graph/1"
#: Bump whenever `NODE_FEATURES`, `GLOBAL_FEATURES` or their scaling change: checkpoints
#: trained on another version are refused.
FEATURE_VERSION = 2
MAX_LAYERS = 512
MAX_SEEDS = 16
#: Every node and global feature is clamped to [-FEATURE_LIMIT, FEATURE_LIMIT] (see above).
FEATURE_LIMIT = 100.0
MAX_INTEGER = 2**53  # steps, widths and counts: exact as floats (features are floats)

STAGES = (
    "DORMANT",
    "GERMINATED",
    "LOADING",
    "TRAINING",
    "BLENDING",
    "PROBATION",
    "FOSSILIZED",
    "CULLED",
    "EMBARGOED",
    "ERROR_RECOVERY",
)
#: Stages of an adaptation in progress (a layer holding one is busy).
IN_FLIGHT_STAGES = frozenset(
    {"GERMINATED", "LOADING", "TRAINING", "BLENDING", "PROBATION", "ERROR_RECOVERY"}
)
LAYOUTS = ("features", "channels")
GRAFTS = ("residual", "parallel", "bridge")
HOST_TYPES = ("Linear", "Conv2d")
EDGE_FEATURES = ("forward", "backward", "same_layer")

NODE_FEATURES: tuple[str, ...] = (
    "type_linear",  # host class is exactly nn.Linear
    "type_conv2d",  # host class is exactly nn.Conv2d
    "layout_features",
    "layout_channels",
    "log_in",  # log1p(in features / channels)
    "log_out",  # log1p(out features / channels)
    "log_host_params",  # log1p(host layer parameter count)
    "depth",  # layer position in forward order, 0..1
    "act_mean",  # symlog(activation mean); 0 when missing
    "act_std",  # log1p(activation std); 0 when missing
    "act_dead_fraction",  # 0..1; 0 when missing
    "act_missing",  # 1 when the layer has no activation sample yet
    "log_grad_norm",  # log1p(host gradient norm); 0 when missing
    "grad_missing",
    "bridge_site",  # 1 when the layer can host bridge seeds (it has a bridge source)
    "log_bridge_in",  # log1p(the bridge source's input width); 0 when none
    *(f"stage_{name.lower()}" for name in STAGES),  # seed stage one-hot (10)
    "alpha",  # seed blend factor 0..1
    "log_steps_in_stage",  # log1p(steps since the seed's last stage change)
    "log_seed_errors",  # log1p(seed error count)
    "log_seed_params",  # log1p(seed parameter count)
)

GLOBAL_FEATURES: tuple[str, ...] = (
    "progress",  # fraction of planned training done, 0..1
    "budget_used",  # added parameters / allowed parameter budget
    "loss",  # symlog(loss)
    "loss_missing",
    "loss_trend",  # symlog(100 · loss slope)
    "loss_trend_missing",
    "val_metric",  # symlog(validation metric)
    "val_metric_missing",
    "val_trend",  # symlog(100 · validation metric slope)
    "val_trend_missing",
    "log_step",  # log1p(step)
    "log_layers",  # log1p(number of layers)
)

_DOC_FIELDS = ("schema", "step", "layers", "globals")
_LAYER_FIELDS = (
    "name",
    "type",
    "layout",
    "in",
    "out",
    "params",
    "activation",
    "grad_norm",
    "seeds",
)
_OPTIONAL_LAYER_FIELDS = ("bridge_from",)
_ACT_FIELDS = ("mean", "std", "dead_fraction")
_SEED_FIELDS = (
    "index",
    "stage",
    "alpha",
    "kernel_id",
    "graft",
    "latency_us",
    "health",
    "errors",
    "steps_in_stage",
    "params",
)
_GLOBAL_FIELDS = ("progress", "loss", "loss_trend", "val_metric", "val_trend", "budget_used")
_NULLABLE_GLOBALS = frozenset({"loss", "loss_trend", "val_metric", "val_trend"})


class GraphError(ValueError):
    """A graph document is malformed; ``field`` names where (``layers[2].activation.std``)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def _fields(
    obj: object, path: str, names: tuple[str, ...], optional: tuple[str, ...] = ()
) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise GraphError(path or "<document>", f"expected an object, got {type(obj).__name__}")
    prefix = f"{path}." if path else ""
    for name in names:
        if name not in obj:
            raise GraphError(f"{prefix}{name}", "missing field")
    for key in obj:
        if key not in names and key not in optional:
            allowed = ", ".join((*names, *optional))
            raise GraphError(f"{prefix}{key}", f"unknown field; allowed: {allowed}")
    return obj


def _number(value: object, path: str, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GraphError(path, f"expected a number, got {type(value).__name__}")
    try:
        out = float(value)
    except OverflowError:  # an integer beyond any float
        raise GraphError(path, "must be finite, got an integer too large for a float") from None
    if not math.isfinite(out):
        raise GraphError(path, f"must be finite, got {out}")
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise GraphError(path, f"must be in [{lo}, {hi}], got {out}")
    return out


def _integer(value: object, path: str, *, lo: int = 0, hi: int = MAX_INTEGER) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GraphError(path, f"expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        shown = value if abs(value) < 10**30 else f"an integer of {value.bit_length()} bits"
        raise GraphError(path, f"must be in [{lo}, {hi}], got {shown}")
    return value


def _choice(value: object, path: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise GraphError(path, f"expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _text(value: object, path: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 200:
        raise GraphError(path, "expected a non-empty string of at most 200 characters")
    return value


def _seed(obj: object, path: str, position: int) -> dict:
    s = _fields(obj, path, _SEED_FIELDS)
    index = _integer(s["index"], f"{path}.index", hi=MAX_SEEDS - 1)
    if index != position:
        raise GraphError(
            f"{path}.index", f"seeds must be listed in index order; expected {position}"
        )
    kernel_id = s["kernel_id"]
    if kernel_id is not None:
        kernel_id = _text(kernel_id, f"{path}.kernel_id")
    graft = s["graft"]
    return {
        "index": index,
        "stage": _choice(s["stage"], f"{path}.stage", STAGES),
        "alpha": _number(s["alpha"], f"{path}.alpha", lo=0.0, hi=1.0),
        "kernel_id": kernel_id,
        "graft": None if graft is None else _choice(graft, f"{path}.graft", GRAFTS),
        "latency_us": _number(s["latency_us"], f"{path}.latency_us", lo=0.0),
        "health": _number(s["health"], f"{path}.health"),
        "errors": _integer(s["errors"], f"{path}.errors"),
        "steps_in_stage": _integer(s["steps_in_stage"], f"{path}.steps_in_stage"),
        "params": _integer(s["params"], f"{path}.params"),
    }


def _layer(obj: object, path: str) -> dict:
    layer = _fields(obj, path, _LAYER_FIELDS, _OPTIONAL_LAYER_FIELDS)
    bridge_from = layer.get("bridge_from")
    activation = layer["activation"]
    if activation is not None:
        a = _fields(activation, f"{path}.activation", _ACT_FIELDS)
        activation = {
            "mean": _number(a["mean"], f"{path}.activation.mean"),
            "std": _number(a["std"], f"{path}.activation.std", lo=0.0),
            "dead_fraction": _number(
                a["dead_fraction"], f"{path}.activation.dead_fraction", lo=0.0, hi=1.0
            ),
        }
    grad = layer["grad_norm"]
    seeds = layer["seeds"]
    if not isinstance(seeds, list) or not 1 <= len(seeds) <= MAX_SEEDS:
        raise GraphError(f"{path}.seeds", f"expected a list of 1 to {MAX_SEEDS} seeds")
    return {
        "name": _text(layer["name"], f"{path}.name"),
        "type": _text(layer["type"], f"{path}.type"),
        "layout": _choice(layer["layout"], f"{path}.layout", LAYOUTS),
        "in": _integer(layer["in"], f"{path}.in", lo=1),
        "out": _integer(layer["out"], f"{path}.out", lo=1),
        "bridge_from": None if bridge_from is None else _text(bridge_from, f"{path}.bridge_from"),
        "params": _integer(layer["params"], f"{path}.params"),
        "activation": activation,
        "grad_norm": None if grad is None else _number(grad, f"{path}.grad_norm", lo=0.0),
        "seeds": [_seed(s, f"{path}.seeds[{i}]", i) for i, s in enumerate(seeds)],
    }


def validate_graph(doc: object) -> dict:
    """Check a graph document field by field; return a normalised copy (numbers as float/int)."""
    d = _fields(doc, "", _DOC_FIELDS)
    if d["schema"] != GRAPH_SCHEMA:
        raise GraphError("schema", f"expected {GRAPH_SCHEMA!r}, got {d['schema']!r}")
    layers = d["layers"]
    if not isinstance(layers, list) or not 1 <= len(layers) <= MAX_LAYERS:
        raise GraphError("layers", f"expected a list of 1 to {MAX_LAYERS} layers")
    out_layers = [_layer(layer, f"layers[{i}]") for i, layer in enumerate(layers)]
    seen: set[str] = set()
    for i, layer in enumerate(out_layers):
        if layer["name"] in seen:
            raise GraphError(f"layers[{i}].name", f"duplicate layer name {layer['name']!r}")
        seen.add(layer["name"])
    by_name = {layer["name"]: layer for layer in out_layers}
    for i, layer in enumerate(out_layers):
        source = layer["bridge_from"]
        if source is None:
            continue
        if source not in by_name or source == layer["name"]:
            raise GraphError(
                f"layers[{i}].bridge_from", f"expected the name of another layer, got {source!r}"
            )
        if layer["layout"] != "features" or by_name[source]["layout"] != "features":
            raise GraphError(
                f"layers[{i}].bridge_from", "a bridge joins two layers of the features layout"
            )
    g = _fields(d["globals"], "globals", _GLOBAL_FIELDS)
    out_globals: dict[str, float | None] = {}
    for name in _GLOBAL_FIELDS:
        value = g[name]
        if value is None and name in _NULLABLE_GLOBALS:
            out_globals[name] = None
        elif name == "progress":
            out_globals[name] = _number(value, "globals.progress", lo=0.0, hi=1.0)
        elif name == "budget_used":
            out_globals[name] = _number(value, "globals.budget_used", lo=0.0)
        else:
            out_globals[name] = _number(value, f"globals.{name}")
    return {
        "schema": GRAPH_SCHEMA,
        "step": _integer(d["step"], "step"),
        "layers": out_layers,
        "globals": out_globals,
    }


def _symlog(value: float, scale: float = 1.0) -> float:
    """``symlog(scale · value)``; a product past the float range gives ±inf, which `_bounded`
    clamps to the limit."""
    return math.copysign(math.log1p(abs(value) * scale), value)


def _bounded(row: list[float]) -> list[float]:
    """Each feature clamped to [-FEATURE_LIMIT, FEATURE_LIMIT] (NaN, which validation keeps
    out, would become 0 rather than poison the network)."""
    return [
        0.0 if math.isnan(v) else max(-FEATURE_LIMIT, min(FEATURE_LIMIT, float(v))) for v in row
    ]


def _node_row(layer: dict, seed: dict, depth: float, bridge_in: int) -> list[float]:
    act, grad = layer["activation"], layer["grad_norm"]
    return _bounded(
        [
            float(layer["type"] == "Linear"),
            float(layer["type"] == "Conv2d"),
            float(layer["layout"] == "features"),
            float(layer["layout"] == "channels"),
            math.log1p(layer["in"]),
            math.log1p(layer["out"]),
            math.log1p(layer["params"]),
            depth,
            0.0 if act is None else _symlog(act["mean"]),
            0.0 if act is None else math.log1p(act["std"]),
            0.0 if act is None else act["dead_fraction"],
            float(act is None),
            0.0 if grad is None else math.log1p(grad),
            float(grad is None),
            float(bridge_in > 0),
            math.log1p(bridge_in),
            *(float(seed["stage"] == name) for name in STAGES),
            seed["alpha"],
            math.log1p(seed["steps_in_stage"]),
            math.log1p(seed["errors"]),
            math.log1p(seed["params"]),
        ]
    )


def _global_row(doc: dict) -> list[float]:
    g = doc["globals"]

    def pair(name: str, scale: float = 1.0) -> list[float]:
        value = g[name]
        return [0.0, 1.0] if value is None else [_symlog(value, scale), 0.0]

    return _bounded(
        [
            g["progress"],
            g["budget_used"],
            *pair("loss"),
            *pair("loss_trend", 100.0),
            *pair("val_metric"),
            *pair("val_trend", 100.0),
            math.log1p(doc["step"]),
            math.log1p(len(doc["layers"])),
        ]
    )


def to_data(doc: dict) -> Data:
    """The graph of seed sites: ``x`` [N, len(NODE_FEATURES)], ``edge_index``, ``edge_attr``,
    ``u`` [1, len(GLOBAL_FEATURES)], and per node ``node_layer`` (names), ``node_seed``,
    ``node_dims`` (in, out, layout index, bridge source's input width or 0), ``node_stage``
    (index into `STAGES`), ``node_layer_pos`` (layer position), ``node_bridge_pos`` (the
    bridge source's layer position, -1 for none) and ``node_busy`` (its layer has a seed in
    `IN_FLIGHT_STAGES`) for action masks."""
    doc = validate_graph(doc)
    layers = doc["layers"]
    position = {layer["name"]: pos for pos, layer in enumerate(layers)}
    node_bridge_pos: list[int] = []
    rows: list[list[float]] = []
    node_layer: list[str] = []
    node_seed: list[int] = []
    node_dims: list[list[int]] = []
    node_stage: list[int] = []
    node_layer_pos: list[int] = []
    node_busy: list[bool] = []
    sites: list[list[int]] = []
    for pos, layer in enumerate(layers):
        depth = pos / (len(layers) - 1) if len(layers) > 1 else 0.0
        ids = []
        busy = any(seed["stage"] in IN_FLIGHT_STAGES for seed in layer["seeds"])
        source = layer["bridge_from"]
        bridge_in = 0 if source is None else layers[position[source]]["in"]
        for seed in layer["seeds"]:
            ids.append(len(rows))
            rows.append(_node_row(layer, seed, depth, bridge_in))
            node_layer.append(layer["name"])
            node_seed.append(seed["index"])
            node_dims.append([layer["in"], layer["out"], LAYOUTS.index(layer["layout"]), bridge_in])
            node_bridge_pos.append(-1 if source is None else position[source])
            node_stage.append(STAGES.index(seed["stage"]))
            node_layer_pos.append(pos)
            node_busy.append(busy)
        sites.append(ids)
    src: list[int] = []
    dst: list[int] = []
    kind: list[int] = []
    for here, there in zip(sites, sites[1:], strict=False):
        for a in here:
            for b in there:
                src += [a, b]
                dst += [b, a]
                kind += [0, 1]
    for ids in sites:
        for a in ids:
            for b in ids:
                if a != b:
                    src.append(a)
                    dst.append(b)
                    kind.append(2)
    return Data(
        x=torch.tensor(rows, dtype=torch.float32),
        edge_index=torch.tensor([src, dst], dtype=torch.long).reshape(2, -1),
        edge_attr=torch.eye(len(EDGE_FEATURES))[torch.tensor(kind, dtype=torch.long)],
        u=torch.tensor([_global_row(doc)], dtype=torch.float32),
        node_layer=node_layer,
        node_seed=torch.tensor(node_seed, dtype=torch.long),
        node_dims=torch.tensor(node_dims, dtype=torch.long),
        node_stage=torch.tensor(node_stage, dtype=torch.long),
        node_layer_pos=torch.tensor(node_layer_pos, dtype=torch.long),
        node_bridge_pos=torch.tensor(node_bridge_pos, dtype=torch.long),
        node_busy=torch.tensor(node_busy, dtype=torch.bool),
        num_nodes=len(rows),
    )
