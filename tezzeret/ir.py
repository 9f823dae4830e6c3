"""Blueprint IR ``esper.blueprint/1``: validate declarative JSON, fit it to a signature, resolve it.

The IR is data, never code. Dimension expressions are parsed with :mod:`ast` and walked
against a whitelist of node types; nothing is ever evaluated by Python itself.

Symbols: ``D`` is the width the seed reads (``OUT`` for a residual graft, which reads the
host's output; ``IN`` for a parallel graft, which reads the host's input), ``IN`` and
``OUT`` are the host's input and output widths. A residual seed must output ``D`` and
start as the zero function; a parallel seed must output ``OUT``.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import keyword
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

__all__ = [
    "DTYPES",
    "GRAFTS",
    "LAYOUTS",
    "MAX_DEPTH",
    "MAX_DIM",
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
]

SCHEMA_ID = "esper.blueprint/1"
GRAFTS = frozenset({"residual", "parallel"})
LAYOUTS = frozenset({"features", "channels"})
DTYPES = frozenset({"float32", "float64", "bfloat16", "float16"})
SYMBOLS = frozenset({"D", "IN", "OUT"})
MAX_DEPTH = 4
MAX_LAYERS = 32
MAX_PARAMS = 4_000_000
MAX_DIM = 65536
MAX_PARAM_NAMES = 16
MAX_EXPR_CHARS = 120

_NAME_RE = re.compile(r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$")
_PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
_TOP_KEYS = ("schema", "name", "graft", "layout", "params", "layers")
_REQUIRED = object()


class IRError(ValueError):
    """An invalid blueprint or signature; ``field`` is a JSON path such as ``layers[2].out``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


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


# --- expressions -----------------------------------------------------------------------

_EXPR_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.Name, ast.Constant, ast.Load,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.USub, ast.UAdd,
)  # fmt: skip


def _parse_expr(text: str, field: str, names: frozenset[str]) -> tuple[ast.Expression, set[str]]:
    """Parse a dimension expression; returns the tree and the names it references."""
    if len(text) > MAX_EXPR_CHARS:
        raise IRError(field, f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise IRError(
            field,
            f"cannot parse expression {text!r} ({exc.msg if isinstance(exc, SyntaxError) else exc})",
        ) from None
    refs: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, _EXPR_NODES):
            raise IRError(
                field,
                f"expression {text!r} uses {type(node).__name__}; only integers, D, IN, OUT, "
                "param names and + - * / // ( ) are allowed",
            )
        if isinstance(node, ast.Constant) and type(node.value) is not int:
            raise IRError(
                field,
                f"expression {text!r} has the literal {node.value!r}; only integers are allowed",
            )
        if isinstance(node, ast.Name):
            if node.id not in names:
                known = ", ".join(sorted(names))
                raise IRError(
                    field, f"unknown symbol {node.id!r} in {text!r}; known symbols: {known}"
                )
            refs.add(node.id)
    return tree, refs


def _eval(node: ast.AST, env: dict[str, Fraction], field: str) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body, env, field)
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, env, field)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, env, field), _eval(node.right, env, field)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if right == 0:
            raise IRError(field, "division by zero")
        return left / right if isinstance(node.op, ast.Div) else Fraction(left // right)
    raise IRError(field, f"unsupported expression node {type(node).__name__}")  # pragma: no cover


# --- structural validation -------------------------------------------------------------


def _check_keys(data: dict, allowed: tuple[str, ...] | frozenset[str], path: str) -> None:
    for key in data:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise IRError(where, f"unknown key; allowed keys: {', '.join(sorted(allowed))}")


def _check_dim_value(value: Any, field: str, names: frozenset[str]) -> tuple[int | str, set[str]]:
    """A dimension is an int or an expression string; returns it and the names it uses."""
    if type(value) is int:
        return value, set()
    if isinstance(value, str):
        return value.strip(), _parse_expr(value, field, names)[1]
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
        _check_keys(layer, ("op", *fields), lp)
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
        if value not in _INITS:
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


def validate_ir(data: object) -> dict:
    """Full structural validation at submission time; returns a normalised copy.

    Normalisation fills defaults (``params: {}``, ``init: "default"``, ``bias: true``),
    strips expression whitespace and makes ``p`` a float, so `ir_sha256` of the result is
    stable. Whether the IR fits a given host is `check_signature`'s job.
    """
    if not isinstance(data, dict):
        raise IRError("$", f"a blueprint IR is a JSON object, got {type(data).__name__}")
    _check_keys(data, _TOP_KEYS, "")
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
    if data["graft"] not in GRAFTS:
        raise IRError("graft", f"must be one of {', '.join(sorted(GRAFTS))}, got {data['graft']!r}")
    if data["layout"] not in LAYOUTS:
        raise IRError(
            "layout", f"must be one of {', '.join(sorted(LAYOUTS))}, got {data['layout']!r}"
        )
    params, names = _validate_params(data.get("params", {}))
    layers = _validate_layers(data["layers"], "layers", 1, names, data["layout"], [0])
    if data["graft"] == "residual":
        _check_starts_at_zero(layers)
    return {
        "schema": SCHEMA_ID,
        "name": name,
        "graft": data["graft"],
        "layout": data["layout"],
        "params": params,
        "layers": layers,
    }


# --- signatures ------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """The host a kernel is compiled for; ``in_`` is spelt ``in`` in JSON."""

    graft: str
    layout: str
    in_: int
    out: int
    dtype: str

    def __post_init__(self) -> None:
        if self.graft not in GRAFTS:
            raise IRError(
                "signature.graft", f"must be one of {', '.join(sorted(GRAFTS))}, got {self.graft!r}"
            )
        if self.layout not in LAYOUTS:
            raise IRError(
                "signature.layout",
                f"must be one of {', '.join(sorted(LAYOUTS))}, got {self.layout!r}",
            )
        for key, value in (("in", self.in_), ("out", self.out)):
            if type(value) is not int or not 1 <= value <= MAX_DIM:
                raise IRError(
                    f"signature.{key}", f"must be an integer in [1, {MAX_DIM}], got {value!r}"
                )
        if self.dtype not in DTYPES:
            raise IRError(
                "signature.dtype", f"must be one of {', '.join(sorted(DTYPES))}, got {self.dtype!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "graft": self.graft,
            "layout": self.layout,
            "in": self.in_,
            "out": self.out,
            "dtype": self.dtype,
        }


def parse_signature(data: object) -> Signature:
    if isinstance(data, Signature):
        return data
    if not isinstance(data, dict):
        raise IRError(
            "signature",
            f"must be an object with keys graft, layout, in, out, dtype; got {type(data).__name__}",
        )
    keys = ("graft", "layout", "in", "out", "dtype")
    _check_keys(data, keys, "signature")
    for key in keys:
        if key not in data:
            raise IRError(f"signature.{key}", "required")
    return Signature(data["graft"], data["layout"], data["in"], data["out"], data["dtype"])


# --- resolution ------------------------------------------------------------------------


def _dim(value: int | str, field: str, env: dict[str, Fraction], where: str) -> int:
    if isinstance(value, int):
        result = Fraction(value)
    else:
        result = _eval(_parse_expr(value, field, frozenset(env))[0], env, field)
    if result.denominator != 1:
        raise IRError(field, f"{value!r} = {result} is not an integer for {where}")
    if result < 1:
        raise IRError(field, f"{value!r} = {result} must be positive for {where}")
    if result > MAX_DIM:
        raise IRError(field, f"{value!r} = {result} exceeds MAX_DIM={MAX_DIM} for {where}")
    return int(result)


def _resolve_layers(
    layers: list[dict], path: str, dim: int, env: dict[str, Fraction], where: str
) -> tuple[list[dict], int, int, str]:
    """Resolve dims along a chain; returns (layers, output width, params, field that set it)."""
    out_layers, params, source = [], 0, path
    for i, layer in enumerate(layers):
        lp, op, new = f"{path}[{i}]", layer["op"], dict(layer)
        bias = dim if layer.get("bias", False) else 0
        if op in ("linear", "conv1x1", "conv3x3"):
            new["out"] = _dim(layer["out"], f"{lp}.out", env, where)
            params += dim * new["out"] * (9 if op == "conv3x3" else 1) + (
                new["out"] if layer["bias"] else 0
            )
            dim, source = new["out"], f"{lp}.out"
        elif op == "depthwise3x3":
            params += 9 * dim + bias
        elif op in ("layernorm", "batchnorm"):
            params += 2 * dim
        elif op == "groupnorm":
            new["groups"] = _dim(layer["groups"], f"{lp}.groups", env, where)
            if dim % new["groups"]:
                raise IRError(
                    f"{lp}.groups",
                    f"groups={new['groups']} must divide the {dim} channels at this layer ({where})",
                )
            params += 2 * dim
        elif op == "sigmoid-gate":
            params += dim * dim + dim
        elif op == "squeeze-excite":
            new["reduction"] = _dim(layer["reduction"], f"{lp}.reduction", env, where)
            hidden = max(1, dim // new["reduction"])
            params += 2 * dim * hidden + hidden + dim
        elif op == "residual":
            inner, inner_dim, inner_params, inner_source = _resolve_layers(
                layer["layers"], f"{lp}.layers", dim, env, where
            )
            if inner_dim != dim:
                raise IRError(
                    inner_source,
                    f"a residual block must keep its width: it reads {dim} but outputs {inner_dim} ({where})",
                )
            new["layers"], params = inner, params + inner_params
        out_layers.append(new)
    return out_layers, dim, params, source


def _resolve(ir: dict, sig: Signature) -> tuple[dict, int]:
    ir = validate_ir(ir)
    sig = parse_signature(sig)
    if ir["graft"] != sig.graft:
        raise IRError(
            "graft", f"blueprint graft is {ir['graft']!r} but the signature asks for {sig.graft!r}"
        )
    if ir["layout"] != sig.layout:
        raise IRError(
            "layout",
            f"blueprint layout is {ir['layout']!r} but the signature asks for {sig.layout!r}",
        )
    d = sig.out if sig.graft == "residual" else sig.in_
    where = f"D={d}, IN={sig.in_}, OUT={sig.out}"
    env = {"D": Fraction(d), "IN": Fraction(sig.in_), "OUT": Fraction(sig.out)}
    resolved_params: dict[str, int] = {}

    def param(name: str) -> None:
        if name in resolved_params:
            return
        value, field = ir["params"][name], f"params.{name}"
        if isinstance(value, str):
            tree, refs = _parse_expr(value, field, SYMBOLS | frozenset(ir["params"]))
            for ref in sorted(refs - SYMBOLS):
                param(ref)
            result = _eval(tree, env, field)
        else:
            result = Fraction(value)
        if result.denominator != 1 or result < 1:
            raise IRError(
                f"params.{name}", f"{value!r} = {result} is not a positive integer for {where}"
            )
        resolved_params[name] = int(result)
        env[name] = result

    for name in ir["params"]:
        param(name)
    layers, out_dim, params, source = _resolve_layers(ir["layers"], "layers", d, env, where)
    want = d if sig.graft == "residual" else sig.out
    if out_dim != want:
        symbol = "D" if sig.graft == "residual" else "OUT"
        raise IRError(
            source,
            f"a {sig.graft} seed must output {symbol}={want}, this one outputs {out_dim} ({where})",
        )
    if params == 0:
        raise IRError(
            "layers", "the seed has no trainable parameters; add a linear, conv or norm layer"
        )
    if params > MAX_PARAMS:
        raise IRError(
            "layers",
            f"{params:,} parameters for {where} exceed MAX_PARAMS={MAX_PARAMS:,}; use a narrower hidden width",
        )
    resolved = copy.deepcopy(ir)
    resolved["params"], resolved["layers"] = {k: resolved_params[k] for k in ir["params"]}, layers
    return resolved, params


def resolve(ir: dict, sig: Signature) -> dict:
    """The IR with every dimension expression replaced by a concrete int for ``sig``."""
    return _resolve(ir, sig)[0]


def param_count(ir: dict, sig: Signature) -> int:
    """Trainable parameters of the seed built for ``sig``, computed arithmetically."""
    return _resolve(ir, sig)[1]


def check_signature(ir: dict, sig: Signature) -> None:
    """Raise `IRError` unless the blueprint fits ``sig``; cheap (no torch), for request time."""
    _resolve(ir, sig)
