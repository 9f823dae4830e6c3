from __future__ import annotations

import copy

import pytest

from tezzeret.catalogue import CATALOGUE, catalogue_entry
from tezzeret.ir import (
    MAX_DEPTH,
    MAX_LAYERS,
    OPS,
    SCHEMA_ID,
    IRError,
    Signature,
    canonical_json,
    check_signature,
    ir_sha256,
    param_count,
    parse_signature,
    resolve,
    validate_ir,
)


def example_ir(**changes: object) -> dict:
    ir = {
        "schema": SCHEMA_ID,
        "name": "residual-mlp",
        "graft": "residual",
        "layout": "features",
        "params": {"r": "D/4"},
        "layers": [
            {"op": "linear", "out": "r"},
            {"op": "gelu"},
            {"op": "linear", "out": "D", "init": "zeros"},
        ],
    }
    ir.update(changes)
    return ir


def sig(
    graft: str = "residual", layout: str = "features", in_: int = 64, out: int = 64
) -> Signature:
    return Signature(graft=graft, layout=layout, in_=in_, out=out, dtype="float32")


def field_of(data: object) -> str:
    with pytest.raises(IRError) as info:
        validate_ir(data)
    return info.value.field


def test_example_ir_validates_and_fills_defaults():
    ir = validate_ir(example_ir())
    assert ir["layers"][0] == {"op": "linear", "out": "r", "init": "default", "bias": True}
    assert ir["params"] == {"r": "D/4"}
    assert validate_ir(example_ir(params={"r": " D/4 "})) == ir


def test_validation_is_idempotent_and_the_hash_ignores_key_order_and_defaults():
    ir = validate_ir(example_ir())
    assert validate_ir(ir) == ir
    reordered = dict(reversed(list(example_ir().items())))
    assert ir_sha256(validate_ir(reordered)) == ir_sha256(ir)
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'
    assert len(ir_sha256(ir)) == 64


def test_error_string_names_the_field():
    error = IRError("layers[2].out", "bad")
    assert str(error) == "layers[2].out: bad"
    assert isinstance(error, ValueError)


def test_unknown_op_is_rejected_naming_the_layer():
    ir = example_ir(layers=[{"op": "linear", "out": "D"}, {"op": "softmax"}])
    with pytest.raises(IRError, match="unknown op 'softmax'") as info:
        validate_ir(ir)
    assert info.value.field == "layers[1].op"


@pytest.mark.parametrize(
    ("ir", "field"),
    [
        (example_ir(description="x"), "description"),
        (
            example_ir(layers=[{"op": "linear", "out": "D", "init": "zeros", "act": "relu"}]),
            "layers[0].act",
        ),
        (
            example_ir(
                layers=[
                    {"op": "residual", "layers": [{"op": "gelu", "p": 0.1}]},
                    {"op": "linear", "out": "D", "init": "zeros"},
                ]
            ),
            "layers[0].layers[0].p",
        ),
    ],
)
def test_unknown_key_is_rejected_at_every_level(ir, field):
    assert field_of(ir) == field


@pytest.mark.parametrize(
    ("layer", "field"),
    [
        ({"op": "linear"}, "layers[0].out"),
        ({"out": "D"}, "layers[0].op"),
        ({"op": "linear", "out": "D", "init": "ones"}, "layers[0].init"),
        ({"op": "linear", "out": "D", "bias": "yes"}, "layers[0].bias"),
        ({"op": "linear", "out": 2.5}, "layers[0].out"),
        ({"op": "dropout", "p": 1.0}, "layers[0].p"),
        ({"op": "groupnorm"}, "layers[0].groups"),
    ],
)
def test_bad_or_missing_layer_fields_are_rejected(layer, field):
    ir = example_ir(graft="parallel", layers=[layer, {"op": "linear", "out": "OUT"}])
    assert field_of(ir) == field


def test_unresolvable_symbol_is_rejected():
    with pytest.raises(IRError, match="unknown symbol 'WIDTH'") as info:
        validate_ir(example_ir(params={"r": "WIDTH / 4"}))
    assert info.value.field == "params.r"


def test_param_cycle_is_reported_with_its_path():
    with pytest.raises(IRError) as info:
        validate_ir(example_ir(params={"r": "a", "a": "b + 1", "b": "a * 2"}))
    assert str(info.value) == "params.a: cycle a -> b -> a"
    assert field_of(example_ir(params={"r": "r + 1"})) == "params.r"


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "__import__('os').system('true')",
        "D.__class__",
        "(lambda: 1)()",
        "D if D else 1",
        "[D][0]",
        "D ** 2",
        "D % 3",
        "1.5 * D",
        "'D'",
        "True",
        "D; import os",
        "D\x00",
        "(" * 70 + "D" + ")" * 70,
    ],
)
def test_expression_injection_attempts_are_rejected(expression):
    assert field_of(example_ir(params={"r": expression})) == "params.r"


def test_reserved_symbols_cannot_be_params():
    assert field_of(example_ir(params={"D": 4})) == "params.D"


def test_conv_ops_need_the_channels_layout_and_linear_the_features_layout():
    with pytest.raises(IRError, match="needs layout 'channels'") as info:
        validate_ir(example_ir(layers=[{"op": "conv3x3", "out": "D", "init": "zeros"}]))
    assert info.value.field == "layers[0].op"
    channels = example_ir(layout="channels", layers=[{"op": "linear", "out": "D", "init": "zeros"}])
    assert field_of(channels) == "layers[0].op"


def test_nesting_deeper_than_max_depth_is_rejected():
    def nested(depth: int) -> list[dict]:
        if depth == 1:
            return [{"op": "linear", "out": "D"}]
        return [{"op": "residual", "layers": nested(depth - 1)}]

    zero = {"op": "linear", "out": "D", "init": "zeros"}
    validate_ir(example_ir(layers=[*nested(MAX_DEPTH), zero]))
    with pytest.raises(IRError, match="MAX_DEPTH"):
        validate_ir(example_ir(layers=[*nested(MAX_DEPTH + 1), zero]))


def test_more_than_max_layers_is_rejected():
    layers = [{"op": "gelu"}] * MAX_LAYERS + [{"op": "linear", "out": "D", "init": "zeros"}]
    assert field_of(example_ir(layers=layers)) == f"layers[{MAX_LAYERS}]"


def test_residual_graft_must_start_as_the_zero_function():
    with pytest.raises(IRError, match="zero function") as info:
        validate_ir(example_ir(layers=[{"op": "linear", "out": "D"}, {"op": "gelu"}]))
    assert info.value.field == "layers[0].init"
    assert (
        field_of(
            example_ir(layers=[{"op": "linear", "out": "D", "init": "zeros"}, {"op": "layernorm"}])
        )
        == "layers[1]"
    )
    validate_ir(
        example_ir(
            layers=[
                {"op": "linear", "out": "D", "init": "zeros"},
                {"op": "sigmoid-gate"},
                {"op": "tanh"},
            ]
        )
    )


@pytest.mark.parametrize("data", [None, [], "ir"])
def test_non_objects_are_rejected(data):
    assert field_of(data) == "$"


def test_wrong_schema_and_missing_keys_are_rejected():
    assert field_of(example_ir(schema="esper.blueprint/2")) == "schema"
    incomplete = example_ir()
    del incomplete["layout"]
    assert field_of(incomplete) == "layout"


@pytest.mark.parametrize(
    ("key", "value"),
    [("name", "Bad Name"), ("graft", "serial"), ("layout", "tokens"), ("layers", [])],
)
def test_top_level_values_are_checked(key, value):
    assert field_of(example_ir(**{key: value})) == key


def test_ops_whitelist_is_the_documented_one():
    assert {
        "linear",
        "conv1x1",
        "conv3x3",
        "depthwise3x3",
        "layernorm",
        "batchnorm",
        "groupnorm",
    } <= OPS
    assert {
        "relu",
        "gelu",
        "silu",
        "tanh",
        "sigmoid-gate",
        "dropout",
        "squeeze-excite",
        "residual",
    } <= OPS


# --- signatures ------------------------------------------------------------------------


def test_signature_round_trips_through_json_dicts():
    data = {"graft": "parallel", "layout": "features", "in": 32, "out": 64, "dtype": "bfloat16"}
    parsed = parse_signature(data)
    assert parsed == Signature("parallel", "features", 32, 64, "bfloat16")
    assert parsed.to_dict() == data


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"extra": 1}, "signature.extra"),
        ({"in": 0}, "signature.in"),
        ({"out": 65537}, "signature.out"),
        ({"in": True}, "signature.in"),
        ({"in": "64"}, "signature.in"),
        ({"dtype": "int8"}, "signature.dtype"),
        ({"graft": "serial"}, "signature.graft"),
    ],
)
def test_bad_signatures_name_the_field(changes, field):
    data = {
        "graft": "residual",
        "layout": "features",
        "in": 64,
        "out": 64,
        "dtype": "float32",
    } | changes
    with pytest.raises(IRError) as info:
        parse_signature(data)
    assert info.value.field == field


def test_missing_signature_key_is_rejected():
    with pytest.raises(IRError) as info:
        parse_signature({"graft": "residual", "layout": "features", "in": 64, "out": 64})
    assert info.value.field == "signature.dtype"


def test_graft_and_layout_mismatches_are_rejected():
    ir = validate_ir(example_ir())
    with pytest.raises(IRError) as info:
        check_signature(ir, sig(graft="parallel"))
    assert info.value.field == "graft"
    with pytest.raises(IRError) as info:
        check_signature(ir, sig(layout="channels"))
    assert info.value.field == "layout"


def test_symbol_that_resolves_to_a_fraction_names_the_param():
    with pytest.raises(IRError, match="not a positive integer") as info:
        check_signature(example_ir(), sig(in_=6, out=6))
    assert info.value.field == "params.r"
    with pytest.raises(IRError) as info:
        check_signature(
            example_ir(
                params={},
                layers=[
                    {"op": "linear", "out": "D - 10"},
                    {"op": "linear", "out": "D", "init": "zeros"},
                ],
            ),
            sig(out=8),
        )
    assert info.value.field == "layers[0].out"


def test_residual_seed_reads_and_outputs_the_host_output_width():
    resolved = resolve(example_ir(), sig(in_=32, out=64))
    assert resolved["params"] == {"r": 16}
    assert [layer.get("out") for layer in resolved["layers"]] == [16, None, 64]
    bad = example_ir(layers=[{"op": "linear", "out": "r", "init": "zeros"}])
    with pytest.raises(IRError, match="must output D=64") as info:
        check_signature(bad, sig(in_=32, out=64))
    assert info.value.field == "layers[0].out"


def test_parallel_seed_reads_the_host_input_and_outputs_out():
    ir = example_ir(
        graft="parallel",
        params={},
        layers=[{"op": "linear", "out": "D"}, {"op": "linear", "out": "OUT"}],
    )
    resolved = resolve(ir, sig(graft="parallel", in_=24, out=40))
    assert [layer["out"] for layer in resolved["layers"]] == [24, 40]
    assert param_count(ir, sig(graft="parallel", in_=24, out=40)) == 24 * 24 + 24 + 24 * 40 + 40
    short = example_ir(graft="parallel", params={}, layers=[{"op": "linear", "out": "IN"}])
    with pytest.raises(IRError, match="must output OUT=40"):
        check_signature(short, sig(graft="parallel", in_=24, out=40))


def test_resolved_param_count_over_the_limit_is_rejected():
    wide = example_ir(
        params={},
        layers=[{"op": "linear", "out": "8 * D"}, {"op": "linear", "out": "D", "init": "zeros"}],
    )
    check_signature(wide, sig(in_=256, out=256))
    with pytest.raises(IRError, match="MAX_PARAMS") as info:
        check_signature(wide, sig(in_=1024, out=1024))
    assert info.value.field == "layers"


def test_residual_block_must_keep_its_width_and_groups_must_divide():
    block = {"op": "residual", "layers": [{"op": "linear", "out": "r"}]}
    ir = example_ir(layers=[block, {"op": "linear", "out": "D", "init": "zeros"}])
    with pytest.raises(IRError, match="keep its width") as info:
        check_signature(ir, sig())
    assert info.value.field == "layers[0].layers[0].out"
    grouped = example_ir(
        layers=[{"op": "groupnorm", "groups": 3}, {"op": "linear", "out": "D", "init": "zeros"}]
    )
    with pytest.raises(IRError) as info:
        check_signature(grouped, sig())
    assert info.value.field == "layers[0].groups"


def test_seed_without_parameters_is_rejected():
    ir = example_ir(graft="parallel", params={}, layers=[{"op": "gelu"}])
    with pytest.raises(IRError, match="no trainable parameters"):
        check_signature(ir, sig(graft="parallel"))


# --- catalogue ---------------------------------------------------------------------------


@pytest.mark.parametrize("entry", CATALOGUE, ids=lambda e: e["name"])
def test_every_catalogue_entry_validates_and_fits_a_typical_host(entry):
    assert set(entry) == {"name", "version", "description", "tags", "ir"}
    ir = validate_ir(entry["ir"])
    assert ir["name"] == entry["name"]
    for width in (3, 16, 64, 256):
        check_signature(ir, sig(graft=ir["graft"], layout=ir["layout"], in_=width, out=width))


def test_catalogue_has_the_documented_blueprints():
    names = {entry["name"] for entry in CATALOGUE}
    assert len(CATALOGUE) >= 8 and len(names) == len(CATALOGUE)
    assert {
        "residual-mlp-small", "residual-mlp-wide", "lowrank-adapter", "parallel-widening-mlp",
        "conv1x1-bottleneck", "depthwise-separable", "squeeze-excite", "norm-gated-residual",
    } <= names  # fmt: skip


def test_catalogue_entry_returns_a_copy_and_lists_names_when_unknown():
    entry = catalogue_entry("lowrank-adapter")
    entry["ir"]["layers"].clear()
    assert catalogue_entry("lowrank-adapter")["ir"]["layers"]
    with pytest.raises(KeyError, match="residual-mlp-small"):
        catalogue_entry("nope")


def test_validate_ir_does_not_mutate_its_input():
    data = example_ir()
    before = copy.deepcopy(data)
    validate_ir(data)
    resolve(data, sig())
    assert data == before


def test_a_bridge_reads_in_and_writes_out_and_must_be_a_features_graft():
    ir = validate_ir(catalogue_entry("bridge-mlp-8")["ir"])
    sig = parse_signature(_bridge_sig())
    resolved = resolve(ir, sig)
    assert param_count(ir, sig) == 64 * 8 + 8 * 10  # IN -> 8 -> OUT, no biases
    assert [layer["out"] for layer in resolved["layers"] if "out" in layer] == [8, 10]
    with pytest.raises(IRError, match="layout.*'features'") as info:
        validate_ir({**ir, "layout": "channels"})
    assert info.value.field == "layout"


def _bridge_sig() -> dict:
    return {"graft": "bridge", "layout": "features", "in": 64, "out": 10, "dtype": "float32"}


def test_a_validated_ir_is_remembered_and_an_invalid_one_raises_every_time():
    from tezzeret import ir as ir_mod

    entry = CATALOGUE[0]["ir"]
    first = ir_mod._validated(copy.deepcopy(entry))
    assert ir_mod._validated(copy.deepcopy(entry)) is first
    assert first == ir_mod.validate_ir(entry)
    bad = {**entry, "layers": [{"op": "nope"}]}
    for _ in range(2):
        with pytest.raises(IRError, match="layers"):
            ir_mod._validated(bad)
