"""Dimension expressions are bounded: chained params cannot blow up exact arithmetic.

A fuzzer found that params multiplying the previous one (p0 = "D*D*...", p1 = "p0*p0*...",
...) made every evaluation take seconds or all memory, on blueprint creation's first use
and on every later decision. Every value is now bounded by `MAX_EXPR_VALUE`.
"""

from __future__ import annotations

import ast
from fractions import Fraction

import pytest

from tezzeret._expr import (
    MAX_EXPR_CHARS,
    MAX_EXPR_VALUE,
    ExprRangeError,
    IRError,
    eval_expr,
    parse_expr,
)
from tezzeret._resolve import MAX_DIM, fit
from tezzeret.ir import SCHEMA_ID, Signature, ir_sha256, param_count, validate_ir

NAMES = frozenset({"D", "IN", "OUT", "p"})
SIGNATURE = {"graft": "residual", "layout": "features", "in": 32, "out": 32, "dtype": "float32"}


def evaluate(text: str, **env: int) -> Fraction:
    tree = parse_expr(text, "params.x", NAMES)[0]
    return eval_expr(tree, {k: Fraction(v) for k, v in env.items()}, "params.x", text=text)


def chain_params(levels: int = 16) -> dict[str, str]:
    """The fuzzer's IR params: each the longest product of the previous one that fits."""
    params = {"p0": "*".join(["D"] * 60)}
    for i in range(1, levels):
        prev = f"p{i - 1}"
        params[f"p{i}"] = "*".join([prev] * ((MAX_EXPR_CHARS + 1) // (len(prev) + 1)))
    return params


def residual_ir(params: dict, hidden: int | str = "D") -> dict:
    """A normalised residual IR (defaults filled in), as `validate_ir` stores it."""
    return {
        "schema": SCHEMA_ID,
        "name": "chained",
        "graft": "residual",
        "layout": "features",
        "params": params,
        "layers": [
            {"op": "linear", "out": hidden, "init": "default", "bias": True},
            {"op": "gelu"},
            {"op": "linear", "out": "D", "init": "zeros", "bias": True},
        ],
    }


# Zero (so never a usable width) at D = 1 and D = MAX_DIM, where `validate_ir` probes, but
# p0 is about 2**21 at D = 32 and p1 = p0**3 leaves the range: accepted, fails at fit.
BETWEEN_PARAMS = {"p0": "(D-1)*(65536-D)", "p1": "p0*p0*p0"}


# --- the evaluator ------------------------------------------------------------------------


def test_values_up_to_the_bound_evaluate_exactly():
    assert MAX_EXPR_VALUE == 2**62
    assert evaluate("D*D*D", D=MAX_DIM) == 2**48
    assert evaluate("D*D*D*D/4", D=2**15) == 2**58
    assert evaluate("4611686018427387904") == MAX_EXPR_VALUE
    assert evaluate("-4611686018427387904") == -MAX_EXPR_VALUE
    assert evaluate("1/4611686018427387904") == Fraction(1, MAX_EXPR_VALUE)
    assert evaluate("D*D*D*D*D*D*D*D*D*D/(D*D*D*D*D*D*D*D*D)", D=64) == 64


@pytest.mark.parametrize(
    "text, env",
    [
        ("D*D*D*D*D", {"D": MAX_DIM}),  # a product
        ("4611686018427387904+1", {}),  # a sum
        ("-4611686018427387904-1", {}),  # a difference, by magnitude
        ("4611686018427387905", {}),  # a literal
        ("1/4611686018427387904/2", {}),  # a denominator
        ("(p*p)//1", {"p": 2**31 + 1}),  # a product under a floor division
        ("p", {"p": 2**100}),  # a variable
        ("p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p*p", {"p": 2**20}),
    ],
)
def test_a_value_past_the_bound_is_an_out_of_range_error(text, env):
    with pytest.raises(ExprRangeError) as info:
        evaluate(text, **env)
    error = info.value
    assert isinstance(error, IRError) and isinstance(error, ValueError)
    assert error.field == "params.x"
    assert "is out of range" in error.message and "2**62" in error.message
    assert text[:20] in error.message  # names the expression (shortened when long)
    assert len(error.message) < 250  # never the value's digits


def test_the_message_without_source_text_unparses_the_tree_and_says_where():
    tree = parse_expr("D*D*D*D*D", "layers[0].out", NAMES)[0]
    with pytest.raises(ExprRangeError, match=r"'D \* D \* D \* D \* D' is out of range for D=9"):
        eval_expr(tree, {"D": Fraction(MAX_DIM)}, "layers[0].out", where="D=9")


def test_a_huge_variable_is_refused_without_formatting_it():
    huge = Fraction(10**5000)  # str() of it would raise past Python's 4300-digit limit
    tree = ast.Expression(body=ast.Name(id="p", ctx=ast.Load()))
    with pytest.raises(ExprRangeError, match="out of range"):
        eval_expr(tree, {"p": huge}, "params.q")


def test_division_by_zero_is_still_a_plain_ir_error():
    with pytest.raises(IRError, match="division by zero") as info:
        evaluate("D/(D-D)", D=4)
    assert not isinstance(info.value, ExprRangeError)


# --- validation and fitting ---------------------------------------------------------------


def test_validate_ir_rejects_the_fuzzers_chained_params_naming_the_first():
    with pytest.raises(ExprRangeError) as info:
        validate_ir(residual_ir(chain_params(), hidden="p15"))
    assert info.value.field == "params.p0"
    assert "out of range for D=IN=OUT=65536" in info.value.message


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"params": {"p": "D*D", "q": "p*p*p"}}, "params.q"),
        ({"params": {"p": 10**100}}, "params.p"),
        ({"params": {"p": -(10**4000)}}, "params.p"),
        ({"hidden": "D*D*D*D*D"}, "layers[0].out"),
        ({"hidden": 10**30}, "layers[0].out"),
        ({"params": {"p": "D/8"}, "hidden": "p*p*p*p*p*p*p*p"}, "layers[0].out"),
        ({"params": {"p": "65536*65536/D"}, "hidden": "p*p"}, "layers[0].out"),  # at D=1
    ],
)
def test_validate_ir_rejects_params_and_dims_that_leave_the_range(changes, field):
    params, hidden = changes.get("params", {}), changes.get("hidden", "D")
    with pytest.raises(ExprRangeError) as info:
        validate_ir(residual_ir(params, hidden))
    assert info.value.field == field
    assert len(info.value.message) < 250


def test_validate_ir_still_accepts_params_that_are_unusable_only_at_some_widths():
    ir = residual_ir({"r": "D/4", "s": "D-64", "t": "s*2", "u": "D*D*D/D"}, hidden="r")
    assert validate_ir(ir)["params"] == ir["params"]


def test_fit_of_an_unvalidated_chain_stops_at_the_bound():
    """A blueprint stored before the bound existed fails fast wherever it is fitted."""
    ir = residual_ir(chain_params(), hidden="p15")
    sig = Signature(graft="residual", layout="features", in_=2, out=2, dtype="float32")
    with pytest.raises(ExprRangeError) as info:
        fit(ir, sig)
    assert info.value.field == "params.p1"
    assert "out of range for D=2, IN=2, OUT=2" in info.value.message


def test_an_ir_that_overflows_between_the_probed_widths_fails_at_fit():
    ir = validate_ir(residual_ir(BETWEEN_PARAMS, hidden="D"))
    sig = Signature(graft="residual", layout="features", in_=32, out=32, dtype="float32")
    with pytest.raises(ExprRangeError) as info:
        param_count(ir, sig)
    assert info.value.field == "params.p1"


# --- the API and the decision path --------------------------------------------------------


def _error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    return body["error"]


@pytest.mark.django_db
@pytest.mark.fast
def test_posting_the_chained_blueprint_gets_400_naming_the_param(api_client):
    from urza.models import Blueprint

    ir = residual_ir(chain_params(), hidden="p15")
    response = api_client.post(
        "/api/v1/blueprints/", {"name": "chained", "version": 1, "ir": ir}, format="json"
    )
    assert response.status_code == 400, response.content
    error = _error(response)
    assert error["message"].startswith("ir.params.p0: expression 'D*D*D")
    assert "out of range" in error["message"]
    assert list(error["detail"]) == ["ir.params.p0"]
    assert not Blueprint.objects.filter(name="chained").exists()


def _stored(ir: dict, name: str):
    """A blueprint row written as if before the bound existed (no validation)."""
    from urza.models import Blueprint

    return Blueprint.objects.create(name=name, version=1, ir=ir, ir_sha256=ir_sha256(ir))


@pytest.mark.django_db
@pytest.mark.fast
@pytest.mark.parametrize(
    "kind, message",
    [
        # re-validated when fitted: the probe at the widest signature refuses it
        ("stored-chain", "signature.params.p0: expression 'D*D*D*D*D*D*D*D*D*D*D*D*D*D*D*D*D*"),
        ("accepted-between", "signature.params.p1: expression 'p0*p0*p0'"),
    ],
)
def test_a_kernel_for_an_out_of_range_blueprint_gets_400_and_decisions_skip_it(
    api_client, kind, message
):
    from tamiyo.services.decisions import feasibility
    from urza import services as urza_services
    from urza.errors import ApplicationError
    from urza.models import Blueprint, Kernel

    if kind == "stored-chain":
        bad = _stored(residual_ir(chain_params(), hidden="p15"), "stored-chain")
    else:
        response = api_client.post(
            "/api/v1/blueprints/",
            {"name": "between", "version": 1, "ir": residual_ir(BETWEEN_PARAMS)},
            format="json",
        )
        assert response.status_code == 201, response.content
        bad = Blueprint.objects.get(pk=response.json()["id"])
    good = urza_services.blueprint_create(
        name="fine", version=1, ir=residual_ir({"r": "D/4"}, hidden="r")
    )

    response = api_client.post(
        "/api/v1/kernels/", {"blueprint": bad.id, "signature": SIGNATURE}, format="json"
    )
    assert response.status_code == 400, response.content
    error = _error(response)
    assert error["message"].startswith(message)
    assert "is out of range for D=" in error["message"]
    assert not Kernel.objects.exists()

    with pytest.raises(ApplicationError) as info:
        urza_services.kernel_param_count(ir=bad.ir, signature=SIGNATURE)
    assert info.value.status == 400

    doc = {
        "layers": [
            {"name": "fc1", "in": 32, "out": 32, "layout": "features", "seeds": ["s0"]},
        ]
    }
    fits, estimates = feasibility(doc=doc, blueprints=[bad, good], dtype="float32")
    assert fits == [[False, True]]
    assert estimates[0] is None and estimates[1] > 0
