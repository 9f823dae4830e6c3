"""Blueprint IR ``esper.blueprint/1``: validate declarative JSON, fit it to a signature, resolve it.

Over 400 lines because it has one reason to change, the schema: the op table `_OP_FIELDS` and
every check that walks it change together (the fitting arithmetic is `tezzeret._resolve`,
the host a kernel is built for `tezzeret.signature`).

The IR is data, never code. Dimension expressions are parsed with :mod:`ast` and walked
against a whitelist of node types; nothing is ever evaluated by Python itself.

Symbols: ``D`` is the width the seed reads (``OUT`` for a residual graft, which reads the
host's output; ``IN`` for a parallel graft, which reads the host's input, and for a bridge
graft, which reads the input of the layer feeding the host), ``IN`` and ``OUT`` are the
widths the seed reads and writes (the host's input and output; a bridge's ``IN`` is its
source layer's input). A residual seed must output ``D`` and start as the zero function;
parallel and bridge seeds must output ``OUT``; a bridge's layout is ``features``.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from tezzeret._expr import (
    MAX_EXPR_VALUE,
    SYMBOLS,
    ExprRangeError,
    IRError,
    check_keys,
    check_range,
    eval_expr,
    is_one_of,
    parse_expr,
)
from tezzeret._resolve import MAX_PARAMS, fit, resolve_params
from tezzeret.signature import DTYPES, GRAFTS, LAYOUTS, MAX_DIM, Signature, parse_signature

__all__ = [
    "DTYPES",
    "GRAFTS",
    "LAYOUTS",
    "MAX_DEPTH",
    "MAX_DIM",
    "MAX_EXPR_VALUE",
    "MAX_LAYERS",
    "MAX_PARAMS",
    "OPS",
    "SCHEMA_ID",
    "SYMBOLS",
    "IRError",
    "Signature",
    "canonical_json",
    "check_signature",
    "ir_sha256",
    "param_count",
    "parse_signature",
    "resolve",
    "validate_ir",
    "validate_submission",
]

SCHEMA_ID = "esper.blueprint/1"
MAX_DEPTH = 4
MAX_LAYERS = 32
MAX_PARAM_NAMES = 16

_NAME_RE = re.compile(r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$")
_PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
_TOP_KEYS = ("schema", "name", "graft", "layout", "params", "layers")
_REQUIRED = object()


@dataclass(frozen=True)
class _Field:
    kind: str  # "dim" | "init" | "bool" | "prob" | "layers"
    default: Any = _REQUIRED


_WEIGHTED = {"out": _Field("dim"), "init": _Field("init", "default"), "bias": _Field("bool", True)}
_OP_FIELDS: dict[str, dict[str, _Field]] = {
    "linear": _WEIGHTED,
    "conv1x1": _WEIGHTED,
    "conv3x3": _WEIGHTED,
    "depthwise3x3": {"init": _Field("init", "default"), "bias": _Field("bool", True)},
    "layernorm": {},
    "batchnorm": {},
    "groupnorm": {"groups": _Field("dim")},
    "relu": {},
    "gelu": {},
    "silu": {},
    "tanh": {},
    "sigmoid-gate": {},
    "dropout": {"p": _Field("prob")},
    "squeeze-excite": {"reduction": _Field("dim")},
    "residual": {"layers": _Field("layers")},
}
OPS = frozenset(_OP_FIELDS)
_CHANNEL_ONLY = frozenset({"conv1x1", "conv3x3", "depthwise3x3"})
_LAYOUT_OPS = {"features": OPS - _CHANNEL_ONLY, "channels": OPS - {"linear"}}
_INITS = ("default", "zeros")
# Ops with f(0) == 0 for any parameters, so a zero input stays zero through them.
_ZERO_PRESERVING = frozenset(
    {"relu", "gelu", "silu", "tanh", "dropout", "sigmoid-gate", "squeeze-excite"}
)
_ZEROABLE = frozenset({"linear", "conv1x1", "conv3x3", "depthwise3x3"})


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def ir_sha256(ir: dict) -> str:
    """Pass the output of `validate_ir`, so equivalent spellings of one IR hash alike."""
    return hashlib.sha256(canonical_json(ir).encode("utf-8")).hexdigest()


# --- structural validation -------------------------------------------------------------


def _check_dim_value(value: Any, field: str, names: frozenset[str]) -> tuple[int | str, set[str]]:
    """A dimension is an int or an expression string; returns it and the names it uses."""
    if type(value) is int:
        check_range(value, field, None)
        return value, set()
    if isinstance(value, str):
        return value.strip(), parse_expr(value, field, names)[1]
    raise IRError(field, f"must be an integer or an expression string, got {type(value).__name__}")


def _validate_params(params: Any) -> tuple[dict[str, int | str], frozenset[str]]:
    if not isinstance(params, dict):
        raise IRError("params", "must be an object mapping names to integers or expressions")
    if len(params) > MAX_PARAM_NAMES:
        raise IRError("params", f"at most {MAX_PARAM_NAMES} params are allowed")
    for name in params:
        if not isinstance(name, str) or not _PARAM_RE.match(name) or keyword.iskeyword(name):
            raise IRError(f"params.{name}", "param names are identifiers of at most 32 characters")
        if name in SYMBOLS:
            raise IRError(
                f"params.{name}", f"{name!r} is a built-in symbol and cannot be redefined"
            )
    names = SYMBOLS | frozenset(params)
    out: dict[str, int | str] = {}
    deps: dict[str, set[str]] = {}
    for name, value in params.items():
        out[name], refs = _check_dim_value(value, f"params.{name}", names)
        deps[name] = refs - SYMBOLS
    _check_cycles(deps)
    return out, names


def _check_cycles(deps: dict[str, set[str]]) -> None:
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name) :] + [name]
            raise IRError(f"params.{cycle[0]}", "cycle " + " -> ".join(cycle))
        if name in done:
            return
        for ref in sorted(deps[name]):
            visit(ref, [*path, name])
        done.add(name)

    for name in deps:
        visit(name, [])


def _validate_layers(
    layers: Any, path: str, depth: int, names: frozenset[str], layout: str, count: list[int]
) -> list[dict]:
    if not isinstance(layers, list) or not layers:
        raise IRError(path, "must be a non-empty list of layer objects")
    if depth > MAX_DEPTH:
        raise IRError(
            path,
            f"nesting depth {depth} exceeds MAX_DEPTH={MAX_DEPTH}; flatten the residual blocks",
        )
    result = []
    for i, layer in enumerate(layers):
        lp = f"{path}[{i}]"
        count[0] += 1
        if count[0] > MAX_LAYERS:
            raise IRError(lp, f"more than MAX_LAYERS={MAX_LAYERS} layers in total")
        if not isinstance(layer, dict):
            raise IRError(lp, "each layer must be an object with an 'op' key")
        op = layer.get("op", _REQUIRED)
        if op is _REQUIRED:
            raise IRError(f"{lp}.op", "missing; every layer names its op")
        if not isinstance(op, str) or op not in OPS:
            raise IRError(f"{lp}.op", f"unknown op {op!r}; allowed ops: {', '.join(sorted(OPS))}")
        if op not in _LAYOUT_OPS[layout]:
            need, alt = ("channels", "linear") if op in _CHANNEL_ONLY else ("features", "conv1x1")
            raise IRError(
                f"{lp}.op",
                f"op {op!r} needs layout {need!r}, this blueprint has layout {layout!r}; use {alt!r}",
            )
        fields = _OP_FIELDS[op]
        check_keys(layer, ("op", *fields), lp)
        clean: dict[str, Any] = {"op": op}
        for name, spec in fields.items():
            fp = f"{lp}.{name}"
            if name not in layer:
                if spec.default is _REQUIRED:
                    raise IRError(fp, f"required for op {op!r}")
                clean[name] = spec.default
                continue
            clean[name] = _validate_field(layer[name], spec.kind, fp, depth, names, layout, count)
        result.append(clean)
    return result


def _validate_field(
    value: Any,
    kind: str,
    field: str,
    depth: int,
    names: frozenset[str],
    layout: str,
    count: list[int],
) -> Any:
    if kind == "dim":
        return _check_dim_value(value, field, names)[0]
    if kind == "init":
        if not is_one_of(value, _INITS):
            raise IRError(field, f"must be one of {', '.join(_INITS)}, got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise IRError(field, f"must be true or false, got {value!r}")
        return value
    if kind == "prob":
        if type(value) not in (int, float) or not 0.0 <= value < 1.0:
            raise IRError(field, f"must be a number in [0, 1), got {value!r}")
        return float(value)
    return _validate_layers(value, field, depth + 1, names, layout, count)


def _check_starts_at_zero(layers: list[dict]) -> None:
    for i in range(len(layers) - 1, -1, -1):
        op = layers[i]["op"]
        if op in _ZERO_PRESERVING:
            continue
        if op in _ZEROABLE and layers[i]["init"] == "zeros":
            return
        where = f"layers[{i}].init" if op in _ZEROABLE else f"layers[{i}]"
        raise IRError(
            where,
            "a residual graft must start as the zero function: end with a linear/conv layer "
            f'with "init": "zeros" (optionally followed by {", ".join(sorted(_ZERO_PRESERVING))})',
        )


# Widths `_check_ranges` evaluates every expression at (D = IN = OUT): the narrowest and
# the widest a signature may have.
_PROBE_WIDTHS = (1, MAX_DIM)


def _layer_dims(layers: list[dict], path: str) -> Iterator[tuple[str, int | str]]:
    """(field, value) of every dimension in validated ``layers``, nested blocks included."""
    for i, layer in enumerate(layers):
        for name, spec in _OP_FIELDS[layer["op"]].items():
            if spec.kind == "dim":
                yield f"{path}[{i}].{name}", layer[name]
            elif spec.kind == "layers":
                yield from _layer_dims(layer[name], f"{path}[{i}].{name}")


def _check_ranges(params: dict[str, int | str], layers: list[dict]) -> None:
    """Reject expressions whose values leave the evaluator's range (`MAX_EXPR_VALUE`).

    Evaluates params and layer dimensions as `fit` would for a signature with
    D = IN = OUT = each of `_PROBE_WIDTHS`, so an IR that would blow up there (such as a
    chain of params multiplying the previous one) is refused at submission. Only range
    errors are reported: whether a value is a usable width depends on the signature and
    is `fit`'s job, and a param that is not a positive integer there is skipped with
    everything that uses it, as `fit` would stop at it. Cheap: at most
    ``MAX_PARAM_NAMES + MAX_LAYERS`` short expressions per width, each value bounded.
    """
    for width in _PROBE_WIDTHS:
        _probe_at(params, layers, width)


def _probe_at(params: dict[str, int | str], layers: list[dict], width: int) -> None:
    names = SYMBOLS | frozenset(params)
    where = f"D=IN=OUT={width}"
    env: dict[str, Fraction] = {symbol: Fraction(width) for symbol in SYMBOLS}
    unusable = resolve_params(params, env, where, lenient=True)
    for field, value in _layer_dims(layers, "layers"):
        if isinstance(value, int):
            continue  # checked against the bound when the layer was validated
        tree, refs = parse_expr(value, field, names)
        if refs & unusable:
            continue
        try:
            eval_expr(tree, env, field, text=value, where=where)
        except ExprRangeError:
            raise
        except IRError:
            pass  # not a usable width here: `fit` says so for a real signature


def validate_ir(data: object) -> dict:
    """Full structural validation at submission time; returns a normalised copy.

    Normalisation fills defaults (``params: {}``, ``init: "default"``, ``bias: true``),
    strips expression whitespace and makes ``p`` a float, so `ir_sha256` of the result is
    stable. Whether the IR fits a given host is `check_signature`'s job.
    """
    if not isinstance(data, dict):
        raise IRError("$", f"a blueprint IR is a JSON object, got {type(data).__name__}")
    check_keys(data, _TOP_KEYS, "")
    for key in ("schema", "name", "graft", "layout", "layers"):
        if key not in data:
            raise IRError(key, "required")
    if data["schema"] != SCHEMA_ID:
        raise IRError("schema", f"must be {SCHEMA_ID!r}, got {data['schema']!r}")
    name = data["name"]
    if not isinstance(name, str) or len(name) > 64 or not _NAME_RE.match(name):
        raise IRError(
            "name",
            "must be a lowercase slug such as 'residual-mlp' (a-z, 0-9, '-', '_'; at most 64)",
        )
    if not is_one_of(data["graft"], GRAFTS):
        raise IRError("graft", f"must be one of {', '.join(sorted(GRAFTS))}, got {data['graft']!r}")
    if not is_one_of(data["layout"], LAYOUTS):
        raise IRError(
            "layout", f"must be one of {', '.join(sorted(LAYOUTS))}, got {data['layout']!r}"
        )
    if data["graft"] == "bridge" and data["layout"] != "features":
        raise IRError(
            "layout",
            "a bridge graft reads the input of a Linear layer and writes a Linear layer's "
            "output: its layout must be 'features'",
        )
    params, names = _validate_params(data.get("params", {}))
    layers = _validate_layers(data["layers"], "layers", 1, names, data["layout"], [0])
    if data["graft"] == "residual":
        _check_starts_at_zero(layers)
    _check_ranges(params, layers)
    return {
        "schema": SCHEMA_ID,
        "name": name,
        "graft": data["graft"],
        "layout": data["layout"],
        "params": params,
        "layers": layers,
    }


def validate_submission(data: object) -> dict:
    """`validate_ir` plus the check that the blueprint fits some host (the registry's IR
    validator, run when a blueprint is registered; `validate_ir` alone stays cheap for the
    per-request fit checks)."""
    ir = validate_ir(data)
    _check_fits_some_host(ir)
    return ir


# Host widths `_check_fits_some_host` tries, the common ones first; every (IN, OUT) pair of
# them is a probe, so an IR that needs IN != OUT (or a width divisible by 8) is found too.
_HOST_WIDTHS = (64, 10, 128, 32, 256, 16, 512, 8, 1024, 3, 4, 2, 1, 4096, MAX_DIM)


def _check_fits_some_host(ir: dict) -> None:
    """Refuse an IR that fits no host at all (a division by zero, a layer width of 0 or
    above MAX_DIM, a seed without parameters, ...): every kernel request for it would be
    refused. Tries `fit` for the signatures of `_HOST_WIDTHS` and stops at the first that
    fits, which for a usable IR is nearly always the first; at most 225 cheap `fit` calls."""
    first: IRError | None = None
    for in_ in _HOST_WIDTHS:
        for out in _HOST_WIDTHS:
            if ir["graft"] == "residual" and in_ != out:
                continue  # a residual seed reads and writes D = OUT; IN plays no part
            try:
                fit(ir, Signature(ir["graft"], ir["layout"], in_, out, "float32"))
                return
            except IRError as exc:
                first = first or exc
    if first is None:
        return
    raise IRError(
        first.field,
        f"the blueprint fits no host (tried IN and OUT from 1 to {MAX_DIM:,}); at "
        f"IN=OUT={_HOST_WIDTHS[0]}: {first.message}",
    )


# --- resolution ------------------------------------------------------------------------


_VALIDATED_MAX = 256  # blueprints whose validated IR `_validated` keeps
_validated_irs: OrderedDict[str, dict] = OrderedDict()
_validated_lock = threading.Lock()


def _validated(ir: dict) -> dict:
    """`validate_ir(ir)`, remembered by the IR's canonical JSON for the last
    `_VALIDATED_MAX` IRs: a decision checks every (seed site, blueprint) pair, and the
    validation, not the fit, is most of the cost. The result is only read (`fit` copies
    what it resolves); an invalid IR is not remembered, so it raises every time."""
    key = canonical_json(ir) if isinstance(ir, dict) else None
    if key is not None:
        with _validated_lock:
            hit = _validated_irs.get(key)
            if hit is not None:
                _validated_irs.move_to_end(key)
                return hit
    result = validate_ir(ir)
    if key is not None:
        with _validated_lock:
            _validated_irs[key] = result
            while len(_validated_irs) > _VALIDATED_MAX:
                _validated_irs.popitem(last=False)
    return result


def _fit(ir: dict, sig: Signature | dict) -> tuple[dict, int]:
    return fit(_validated(ir), parse_signature(sig))


def resolve(ir: dict, sig: Signature) -> dict:
    """The IR with every dimension expression replaced by a concrete int for ``sig``."""
    return _fit(ir, sig)[0]


def param_count(ir: dict, sig: Signature) -> int:
    """Trainable parameters of the seed built for ``sig``, computed arithmetically."""
    return _fit(ir, sig)[1]


def check_signature(ir: dict, sig: Signature) -> None:
    """Raise `IRError` unless the blueprint fits ``sig``; cheap (no torch), for request time."""
    _fit(ir, sig)
