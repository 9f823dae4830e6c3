import copy
import math

import pytest
import torch
from torch.testing import assert_close

from tamiyo.graph import (
    EDGE_FEATURES,
    GLOBAL_FEATURES,
    MAX_LAYERS,
    MAX_SEEDS,
    NODE_FEATURES,
    GraphError,
    to_data,
    validate_graph,
)
from tests.tamiyo._snapshots import make_doc, make_layer, make_seed


def _error(doc: object) -> GraphError:
    with pytest.raises(GraphError) as info:
        validate_graph(doc)
    return info.value


def test_valid_snapshot_is_returned_normalised():
    doc = make_doc()
    doc["layers"][0]["grad_norm"] = 1  # an int where a float is expected is fine
    out = validate_graph(doc)
    assert out["layers"][0]["grad_norm"] == 1.0 and isinstance(out["layers"][0]["grad_norm"], float)
    assert out["layers"][2]["seeds"][1] == make_seed(1)
    assert out["globals"] == doc["globals"]


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("layers", 2, "activation", "std"), "layers[2].activation.std"),
        (("layers", 1, "seeds", 0, "stage"), "layers[1].seeds[0].stage"),
        (("globals", "budget_used"), "globals.budget_used"),
        (("step",), "step"),
    ],
)
def test_missing_field_is_named(path, field):
    doc = make_doc()
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    error = _error(doc)
    assert error.field == field
    assert "missing field" in str(error)


def test_unknown_field_is_named_with_the_allowed_ones():
    doc = make_doc()
    doc["layers"][0]["seeds"][1]["colour"] = "red"
    error = _error(doc)
    assert error.field == "layers[0].seeds[1].colour"
    assert "allowed: index, stage" in str(error)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(bad):
    doc = make_doc(loss=bad)
    assert _error(doc).field == "globals.loss"
    doc = make_doc()
    doc["layers"][1]["activation"]["mean"] = bad
    assert _error(doc).field == "layers[1].activation.mean"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(schema="esper.graph/2"), "schema"),
        (lambda d: d["layers"][0].update(layout="rows"), "layers[0].layout"),
        (lambda d: d["layers"][0].update(params=True), "layers[0].params"),
        (lambda d: d["layers"][0].update(**{"in": 0}), "layers[0].in"),
        (lambda d: d["layers"][1].update(name="0"), "layers[1].name"),
        (lambda d: d["layers"][1]["seeds"][1].update(index=0), "layers[1].seeds[1].index"),
        (lambda d: d["layers"][1]["seeds"][1].update(alpha=1.5), "layers[1].seeds[1].alpha"),
        (
            lambda d: d["layers"][2]["activation"].update(dead_fraction=-0.1),
            "layers[2].activation.dead_fraction",
        ),
        (lambda d: d["globals"].update(progress=None), "globals.progress"),
        (lambda d: d.update(layers=[]), "layers"),
        (lambda d: d.update(layers=[make_layer(str(i)) for i in range(MAX_LAYERS + 1)]), "layers"),
        (
            lambda d: d["layers"][0].update(seeds=[make_seed(i) for i in range(MAX_SEEDS + 1)]),
            "layers[0].seeds",
        ),
    ],
)
def test_invalid_values_are_named(mutate, field):
    doc = make_doc()
    mutate(doc)
    assert _error(doc).field == field


def test_not_an_object_is_refused():
    assert _error([1, 2]).field == "<document>"


def test_three_layers_of_two_seeds_make_six_nodes_and_22_edges():
    data = to_data(make_doc())
    assert data.num_nodes == 6
    assert data.x.shape == (6, len(NODE_FEATURES))
    assert data.u.shape == (1, len(GLOBAL_FEATURES))
    # 2 layer pairs × 2×2 seed pairs × 2 directions + 3 layers × 2 ordered same-layer pairs
    assert data.edge_index.shape == (2, 22)
    assert data.edge_attr.shape == (22, len(EDGE_FEATURES))
    assert data.edge_attr.sum(0).tolist() == [8.0, 8.0, 6.0]
    forward = data.edge_index[:, data.edge_attr[:, 0] == 1]
    layer_pos = data.node_layer_pos
    assert torch.equal(layer_pos[forward[1]], layer_pos[forward[0]] + 1)
    same = data.edge_index[:, data.edge_attr[:, 2] == 1]
    assert torch.equal(layer_pos[same[0]], layer_pos[same[1]])
    assert data.node_layer == ["0", "0", "1", "1", "2", "2"]
    assert data.node_seed.tolist() == [0, 1, 0, 1, 0, 1]
    assert data.node_dims.tolist() == [[16, 32, 0, 0]] * 4 + [[16, 32, 1, 0]] * 2
    assert data.node_bridge_pos.tolist() == [-1] * 6


def test_node_and_global_features_are_pinned():
    doc = make_doc()
    doc["layers"][1]["activation"] = None
    doc["layers"][1]["grad_norm"] = None
    doc["layers"][1]["seeds"][1] = make_seed(1, "BLENDING", alpha=0.5, errors=3, params=1000)
    data = to_data(make_doc(doc["layers"], loss_trend=None))
    f = {name: i for i, name in enumerate(NODE_FEATURES)}
    first, blending, conv = data.x[0], data.x[3], data.x[4]
    assert_close(first[f["log_in"]], torch.tensor(math.log1p(16)))
    assert_close(first[f["log_host_params"]], torch.tensor(math.log1p(544)))
    assert_close(first[f["act_mean"]], torch.tensor(math.log1p(0.1)))
    assert_close(first[f["log_grad_norm"]], torch.tensor(math.log1p(0.3)))
    assert first[f["type_linear"]] == 1 and first[f["stage_dormant"]] == 1
    assert blending[f["act_missing"]] == 1 and blending[f["grad_missing"]] == 1
    assert blending[f["act_std"]] == 0 and blending[f["log_grad_norm"]] == 0
    assert blending[f["stage_blending"]] == 1 and blending[f["stage_dormant"]] == 0
    assert_close(blending[f["alpha"]], torch.tensor(0.5))
    assert_close(blending[f["log_seed_errors"]], torch.tensor(math.log1p(3)))
    assert_close(blending[f["depth"]], torch.tensor(0.5))
    assert conv[f["type_conv2d"]] == 1 and conv[f["layout_channels"]] == 1
    assert data.node_busy.tolist() == [False, False, True, True, False, False]
    expected_u = [
        0.3,
        0.1,
        math.log1p(0.52),
        0.0,
        0.0,
        1.0,
        math.log1p(0.81),
        0.0,
        math.log1p(0.2),
        0.0,
        math.log1p(120),
        math.log1p(3),
    ]
    assert_close(data.u, torch.tensor([expected_u]))
    assert data.x[:, f["stage_dormant"] : f["stage_dormant"] + 10].sum(1).tolist() == [1.0] * 6


def test_to_data_is_deterministic_and_does_not_mutate_the_document():
    doc = make_doc()
    before = copy.deepcopy(doc)
    a, b = to_data(doc), to_data(doc)
    assert doc == before
    for key in ("x", "edge_index", "edge_attr", "u", "node_seed", "node_dims", "node_stage"):
        assert torch.equal(a[key], b[key])


def test_single_layer_graph_has_only_same_layer_edges():
    data = to_data(make_doc([make_layer("only", stages=("DORMANT",) * 3)]))
    assert data.num_nodes == 3
    assert data.edge_index.shape == (2, 6)
    assert data.x[:, NODE_FEATURES.index("depth")].tolist() == [0.0] * 3


@pytest.mark.parametrize(
    ("where", "value"),
    [("step", 2**60), ("step", 10**400), ("in", 2**53 + 1), ("params", 10**40)],
)
def test_integers_beyond_a_float_s_exact_range_are_refused(where, value):
    doc = make_doc()
    if where == "step":
        doc["step"] = value
    else:
        doc["layers"][0][where] = value
    error = _error(doc)
    assert "must be in [" in str(error) and len(str(error)) < 200


def test_a_number_beyond_any_float_is_refused_as_not_finite():
    doc = make_doc(loss=10**400)
    assert "must be finite" in str(_error(doc))
