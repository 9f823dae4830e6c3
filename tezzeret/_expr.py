"""`IRError` and the dimension-expression language of the blueprint IR.

Expressions are parsed with :mod:`ast` and walked against a whitelist of node types, then
evaluated here with exact `Fraction` arithmetic; Python never evaluates them itself.
"""

from __future__ import annotations

import ast
from fractions import Fraction

__all__ = ["MAX_EXPR_CHARS", "SYMBOLS", "IRError", "eval_expr", "parse_expr"]

SYMBOLS = frozenset({"D", "IN", "OUT"})
MAX_EXPR_CHARS = 120


class IRError(ValueError):
    """An invalid blueprint or signature; ``field`` is a JSON path such as ``layers[2].out``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


_EXPR_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.Name, ast.Constant, ast.Load,
    ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.USub, ast.UAdd,
)  # fmt: skip


def parse_expr(text: str, field: str, names: frozenset[str]) -> tuple[ast.Expression, set[str]]:
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


def eval_expr(node: ast.AST, env: dict[str, Fraction], field: str) -> Fraction:
    if isinstance(node, ast.Expression):
        return eval_expr(node.body, env, field)
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.UnaryOp):
        value = eval_expr(node.operand, env, field)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = eval_expr(node.left, env, field), eval_expr(node.right, env, field)
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
