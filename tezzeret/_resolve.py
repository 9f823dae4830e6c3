"""Fit a validated blueprint IR to a signature: concrete dims, shape checks, parameter count.

Pure arithmetic, no torch: this runs when a kernel is requested, so it must be cheap.
"""

from __future__ import annotations

import copy
from fractions import Fraction

from tezzeret._expr import SYMBOLS, ExprRangeError, IRError, check_range, eval_expr, parse_expr
from tezzeret.signature import MAX_DIM, Signature

__all__ = ["MAX_DIM", "MAX_PARAMS", "fit", "resolve_params", "se_hidden"]

MAX_PARAMS = 4_000_000


def se_hidden(dim: int, reduction: int) -> int:
    """Hidden width of a squeeze-excite block (never below 1, so it fits narrow layers)."""
    return max(1, dim // reduction)


def _dim(value: int | str, field: str, env: dict[str, Fraction], where: str) -> int:
    if isinstance(value, int):
        result = check_range(value, field, None, where=where)
    else:
        tree = parse_expr(value, field, frozenset(env))[0]
        result = eval_expr(tree, env, field, text=value, where=where)
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
            hidden = se_hidden(dim, new["reduction"])
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


def resolve_params(
    params: dict[str, int | str], env: dict[str, Fraction], where: str, *, lenient: bool = False
) -> set[str]:
    """Evaluate ``params`` into ``env`` (which holds the symbols), each after the params it
    uses. A param that is not a positive integer raises `IRError`; with ``lenient`` it is
    left out of ``env`` instead, with every param that uses it, and only a value out of the
    evaluator's range still raises. Returns the names left out."""
    names = SYMBOLS | frozenset(params)
    unusable: set[str] = set()

    def param(name: str) -> None:
        if name in env or name in unusable:
            return
        value, field = params[name], f"params.{name}"
        if isinstance(value, str):
            tree, refs = parse_expr(value, field, names)
            for ref in sorted(refs - SYMBOLS):
                param(ref)
            if refs & unusable:
                unusable.add(name)
                return
            try:
                result = eval_expr(tree, env, field, text=value, where=where)
            except ExprRangeError:
                raise
            except IRError:
                if not lenient:
                    raise
                unusable.add(name)
                return
        else:
            result = check_range(value, field, None, where=where)
        if result.denominator != 1 or result < 1:
            if not lenient:
                raise IRError(field, f"{value!r} = {result} is not a positive integer for {where}")
            unusable.add(name)
            return
        env[name] = result

    for name in params:
        param(name)
    return unusable


def fit(ir: dict, sig: Signature) -> tuple[dict, int]:
    """Resolve a validated ``ir`` for a parsed ``sig``: (resolved IR, parameter count)."""
    if ir["graft"] != sig.graft:
        raise IRError(
            "graft", f"blueprint graft is {ir['graft']!r} but the signature asks for {sig.graft!r}"
        )
    if ir["layout"] != sig.layout:
        raise IRError(
            "layout",
            f"blueprint layout is {ir['layout']!r} but the signature asks for {sig.layout!r}",
        )
    d = sig.width
    where = f"D={d}, IN={sig.in_}, OUT={sig.out}"
    env = {"D": Fraction(d), "IN": Fraction(sig.in_), "OUT": Fraction(sig.out)}
    resolve_params(ir["params"], env, where)
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
    resolved["params"], resolved["layers"] = {k: int(env[k]) for k in ir["params"]}, layers
    return resolved, params
