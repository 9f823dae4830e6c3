"""The standard blueprint catalogue, registered by ``manage.py load_catalogue`` and a migration.

Entries are immutable once released: change an IR by adding a new ``version``.
``ceil(D/4)`` is spelt ``(D + 3) // 4`` so a bottleneck fits every width, even D < 4.
"""

from __future__ import annotations

import copy

from tezzeret.ir import SCHEMA_ID

__all__ = ["CATALOGUE", "catalogue_entry"]


def _ir(name: str, graft: str, layout: str, layers: list[dict], params: dict | None = None) -> dict:
    return {
        "schema": SCHEMA_ID,
        "name": name,
        "graft": graft,
        "layout": layout,
        "params": params or {},
        "layers": layers,
    }


def _entry(name: str, description: str, tags: list[str], ir: dict) -> dict:
    return {"name": name, "version": 1, "description": description, "tags": tags, "ir": ir}


def _parallel_mlp(name: str, hidden: str, description: str, size: str) -> dict:
    """GELU MLP beside a Linear host (IN -> hidden -> OUT), zero-initialised output."""
    layers = [
        {"op": "linear", "out": hidden},
        {"op": "gelu"},
        {"op": "linear", "out": "OUT", "init": "zeros"},
    ]
    tags = ["parallel", "features", "mlp", size]
    return _entry(name, description, tags, _ir(name, "parallel", "features", layers))


def _bridge(units: int) -> dict:
    """`units` new hidden ReLU units between a Linear layer and the next: IN -> units -> OUT."""
    name = f"bridge-mlp-{units}"
    layers = [
        {"op": "linear", "out": "units", "bias": False},
        {"op": "relu"},
        {"op": "linear", "out": "OUT", "init": "zeros", "bias": False},
    ]
    description = (
        f"Widens the hidden layer between two Linear layers by {units} ReLU units: reads the "
        "first layer's input, adds to the second's output; no biases; starts at zero."
    )
    size = "small" if units <= 8 else "wide"
    tags = ["bridge", "features", "mlp", "widening", size]
    ir = _ir(name, "bridge", "features", layers, {"units": units})
    return _entry(name, description, tags, ir)


_ZERO_LINEAR_D = {"op": "linear", "out": "D", "init": "zeros"}
_ZERO_CONV_D = {"op": "conv1x1", "out": "D", "init": "zeros"}

CATALOGUE: list[dict] = [
    _entry(
        "residual-mlp-small",
        "Bottleneck MLP on the layer output, hidden width ceil(D/4); starts as the zero function.",
        ["residual", "features", "mlp", "small"],
        _ir(
            "residual-mlp-small",
            "residual",
            "features",
            [{"op": "linear", "out": "r"}, {"op": "gelu"}, _ZERO_LINEAR_D],
            {"r": "(D + 3) // 4"},
        ),
    ),
    _entry(
        "residual-mlp-wide",
        "Wide MLP on the layer output, hidden width 2D; starts as the zero function.",
        ["residual", "features", "mlp", "wide"],
        _ir(
            "residual-mlp-wide",
            "residual",
            "features",
            [{"op": "linear", "out": "2 * D"}, {"op": "gelu"}, _ZERO_LINEAR_D],
        ),
    ),
    _entry(
        "lowrank-adapter",
        "LoRA-style rank-8 adapter beside a Linear host: IN -> 8 -> OUT, no biases, B = 0.",
        ["parallel", "features", "adapter", "lowrank", "small"],
        _ir(
            "lowrank-adapter",
            "parallel",
            "features",
            [
                {"op": "linear", "out": "rank", "bias": False},
                {"op": "linear", "out": "OUT", "init": "zeros", "bias": False},
            ],
            {"rank": 8},
        ),
    ),
    _parallel_mlp(
        "parallel-widening-mlp",
        "IN",
        "MLP beside a Linear host with hidden width IN, widening the layer; starts at zero.",
        "wide",
    ),
    _parallel_mlp(
        "parallel-mlp-narrow",
        "OUT",
        "MLP beside a Linear host with hidden width OUT: a narrow widening; starts at zero.",
        "small",
    ),
    _bridge(4),
    _bridge(8),
    _bridge(16),
    _entry(
        "conv1x1-bottleneck",
        "1x1-conv bottleneck (C -> ceil(C/4) -> C) on a conv layer's output; starts at zero.",
        ["residual", "channels", "conv", "small"],
        _ir(
            "conv1x1-bottleneck",
            "residual",
            "channels",
            [{"op": "conv1x1", "out": "r"}, {"op": "gelu"}, _ZERO_CONV_D],
            {"r": "(D + 3) // 4"},
        ),
    ),
    _entry(
        "depthwise-separable",
        "MobileNet-style depthwise 3x3 + batch norm + pointwise 1x1 on a conv output; starts at zero.",
        ["residual", "channels", "conv", "spatial", "batchnorm"],
        _ir(
            "depthwise-separable",
            "residual",
            "channels",
            [{"op": "depthwise3x3"}, {"op": "batchnorm"}, {"op": "gelu"}, _ZERO_CONV_D],
        ),
    ),
    _entry(
        "squeeze-excite",
        "Squeeze-and-excitation channel reweighting (reduction 4), mixed by a zero-init 1x1 conv.",
        ["residual", "channels", "attention", "small"],
        _ir(
            "squeeze-excite",
            "residual",
            "channels",
            [{"op": "squeeze-excite", "reduction": 4}, _ZERO_CONV_D],
        ),
    ),
    _entry(
        "norm-gated-residual",
        "LayerNorm, linear and a sigmoid gate, projected by a zero-init linear; starts at zero.",
        ["residual", "features", "gated", "norm"],
        _ir(
            "norm-gated-residual",
            "residual",
            "features",
            [
                {"op": "layernorm"},
                {"op": "linear", "out": "D"},
                {"op": "sigmoid-gate"},
                _ZERO_LINEAR_D,
            ],
        ),
    ),
    _entry(
        "conv3x3-block",
        "ResNet-style 3x3 conv, group norm (1 group) and SiLU, closed by a zero-init 3x3 conv.",
        ["residual", "channels", "conv", "spatial"],
        _ir(
            "conv3x3-block",
            "residual",
            "channels",
            [
                {"op": "conv3x3", "out": "D"},
                {"op": "groupnorm", "groups": 1},
                {"op": "silu"},
                {"op": "conv3x3", "out": "D", "init": "zeros"},
            ],
        ),
    ),
]


def catalogue_entry(name: str) -> dict:
    """A deep copy of the catalogue entry called ``name``."""
    for entry in CATALOGUE:
        if entry["name"] == name:
            return copy.deepcopy(entry)
    names = ", ".join(entry["name"] for entry in CATALOGUE)
    raise KeyError(f"no catalogue blueprint {name!r}; the catalogue has: {names}")
