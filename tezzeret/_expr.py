"""`IRError`, the checks that raise it, and the dimension-expression language of the IR.

Expressions are parsed with :mod:`ast` and walked against a whitelist of node types, then
evaluated here with exact `Fraction` arithmetic; Python never evaluates them itself.
"""

from __future__ import annotations

import ast
import functools
import threading
from fractions import Fraction

__all__ = [
    "MAX_EXPR_CHARS",
    "MAX_EXPR_VALUE",
    "SYMBOLS",
    "ExprRangeError",
    "IRError",
    "check_keys",
    "check_range",
    "eval_expr",
    "is_one_of",
    "parse_expr",
]

SYMBOLS = frozenset({"D", "IN", "OUT"})
MAX_EXPR_CHARS = 120
# Bound on the magnitude of every value an expression produces, intermediate ones included
# (a Fraction's numerator and denominator each). Widths are at most MAX_DIM = 2**16 and a
# seed has at most MAX_PARAMS = 4e6 < 2**22 parameters, so a sensible expression never comes
# near 2**62 (even D*D*D at MAX_DIM is 2**48), while unbounded exact arithmetic lets a
# chain of params such as p1 = "p0*p0*...", p0 = "D*D*..." grow exponentially and take
# seconds, or all memory, on every evaluation. Checked after every operation, this keeps
# each step to a few machine words.
MAX_EXPR_VALUE = 2**62
_MAX_EXPR_VALUE_TEXT = "2**62"


class IRError(ValueError):
    """An invalid blueprint or signature; ``field`` is a JSON path such as ``layers[2].out``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ExprRangeError(IRError):
    """An expression whose value (or an intermediate one) exceeds `MAX_EXPR_VALUE`."""


def is_one_of(value: object, allowed: frozenset[str] | tuple[str, ...]) -> bool:
    return isinstance(value, str) and value in allowed


def check_keys(data: dict, allowed: tuple[str, ...] | frozenset[str], path: str) -> None:
    for key in data:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise IRError(where, f"unknown key; allowed keys: {', '.join(sorted(allowed))}")


_EXPR_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.Name, ast.Constant, ast.Load,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.USub, ast.UAdd,
)  # fmt: skip


_PARSE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> ast.Expression:
    """`ast.parse` of one expression, once per distinct text (the trees are only read).

    Serialised: CPython 3.11 keeps the AST converter's recursion depth in interpreter-wide
    state, so two threads parsing at once (a compile worker thread and a request thread in
    the embedded server) can fail with ``SystemError: AST constructor recursion depth
    mismatch`` (python/cpython#106905). Another library's parse can still collide with one
    of ours, so that error is retried once."""
    with _PARSE_LOCK:
        try:
            return ast.parse(text, mode="eval")
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc):
                raise
            return ast.parse(text, mode="eval")


def parse_expr(text: str, field: str, names: frozenset[str]) -> tuple[ast.Expression, set[str]]:
    """Parse a dimension expression; returns the tree and the names it references."""
    if len(text) > MAX_EXPR_CHARS:
        raise IRError(field, f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = _parse(text.strip())
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


def _shown(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."


def check_range(
    value: Fraction | int, field: str, source: str | None, *, where: str = ""
) -> Fraction:
    """``value`` as a Fraction, or `ExprRangeError` if it exceeds `MAX_EXPR_VALUE` in magnitude.

    ``source`` is the expression the value came from (None for an integer literal), for
    the message.
    """
    value = Fraction(value)
    if abs(value.numerator) > MAX_EXPR_VALUE or value.denominator > MAX_EXPR_VALUE:
        # Never str() the value itself: it may have thousands of digits.
        suffix = f" for {where}" if where else ""
        if source is None:
            what = f"the integer is out of range{suffix}: it exceeds"
        else:
            what = (
                f"expression {_shown(source.strip())!r} is out of range{suffix}: "
                "a value in it exceeds"
            )
        raise ExprRangeError(
            field,
            f"{what} {_MAX_EXPR_VALUE_TEXT} in magnitude (dimensions are at most a few tens "
            "of thousands)",
        )
    return value


def eval_expr(
    node: ast.AST,
    env: dict[str, Fraction],
    field: str,
    *,
    text: str | None = None,
    where: str = "",
) -> Fraction:
    """Evaluate a tree from `parse_expr` exactly; every value's magnitude is bounded.

    ``text`` (the source; unparsed from ``node`` if omitted) and ``where`` (the symbol
    values, e.g. ``D=64, IN=64, OUT=64``) only go into error messages. Raises
    `ExprRangeError` as soon as a value exceeds `MAX_EXPR_VALUE`, and `IRError` on
    division by zero.
    """

    def check(value: Fraction) -> Fraction:
        return check_range(
            value, field, text if text is not None else ast.unparse(node), where=where
        )

    def walk(n: ast.AST) -> Fraction:
        if isinstance(n, ast.Expression):
            return walk(n.body)
        if isinstance(n, ast.Constant):
            return check(Fraction(n.value))
        if isinstance(n, ast.Name):
            return check(env[n.id])
        if isinstance(n, ast.UnaryOp):
            value = walk(n.operand)
            return -value if isinstance(n.op, ast.USub) else value
        if isinstance(n, ast.BinOp):
            left, right = walk(n.left), walk(n.right)
            if isinstance(n.op, ast.Add):
                return check(left + right)
            if isinstance(n.op, ast.Sub):
                return check(left - right)
            if isinstance(n.op, ast.Mult):
                return check(left * right)
            if right == 0:
                raise IRError(field, "division by zero")
            if isinstance(n.op, ast.Div):
                return check(left / right)
            return check(Fraction(left // right))
        raise IRError(field, f"unsupported expression node {type(n).__name__}")  # pragma: no cover

    return walk(node)
