import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from torch_geometric.data import Batch

from tamiyo.graph import to_data
from tamiyo.policy import (
    GNNPolicy,
    HeuristicPolicy,
    Policy,
    RandomPolicy,
    action_mask,
    create_policy,
    name_bucket,
    validate_blueprints,
)
from tests.tamiyo._snapshots import make_doc, make_layer

CATALOGUE = [
    {
        "id": "a",
        "name": "residual-mlp-wide",
        "graft": "residual",
        "layout": "features",
        "params_estimate": 4096,
    },
    {
        "id": "b",
        "name": "lowrank-parallel",
        "graft": "parallel",
        "layout": "features",
        "params_estimate": 512,
    },
    {"id": "c", "name": "conv1x1-bottleneck", "graft": "residual", "layout": "channels"},
    {"id": "d", "name": "odd-parallel-conv", "graft": "parallel", "layout": "channels"},
    {
        "id": "e",
        "name": "residual-mlp-small",
        "graft": "residual",
        "layout": "features",
        "params_estimate": 1024,
    },
]


WAIT = {"action": "wait", "layer": None, "seed": None, "blueprint_index": None}


def _germinate(data, n: int, k: int) -> dict:
    layer, seed = data.node_layer[n], int(data.node_seed[n])
    return {"action": "germinate", "layer": layer, "seed": seed, "blueprint_index": k}


def _all_actions(data, blueprints, fits=None) -> list[dict]:
    mask = action_mask(data, blueprints, fits=fits)
    return [WAIT] + [_germinate(data, n, k) for n, k in torch.nonzero(mask).tolist()]


def _compilable(data, *, limit: int = 2048, broken_layer: str = "1") -> torch.Tensor:
    """A server's feasibility mask for `CATALOGUE`: nothing over ``limit`` parameters
    compiles, and nothing at all at ``broken_layer``."""
    small = torch.tensor([(b.get("params_estimate") or 0) <= limit for b in CATALOGUE])
    site = torch.tensor([layer != broken_layer for layer in data.node_layer])
    return site[:, None] & small[None, :]


def _busy_doc() -> dict:
    """Layer "0": seed 1 fossilized; layer "1": seed 1 training (busy); Conv2d layer "2"."""
    return make_doc(
        [
            make_layer("0", stages=("DORMANT", "FOSSILIZED")),
            make_layer("1", stages=("DORMANT", "TRAINING")),
            make_layer("2", "Conv2d"),
        ]
    )


def test_masks_follow_stage_layout_and_graft():
    data = to_data(_busy_doc())
    mask = action_mask(data, CATALOGUE)
    features_only = [True, True, False, False, True]
    channels_only = [False, False, True, False, False]  # parallel never fits a Conv2d
    assert mask.tolist() == [
        features_only,  # layer 0 seed 0 dormant
        [False] * 5,  # layer 0 seed 1 fossilized
        [False] * 5,  # layer 1 seed 0 dormant, but its layer is busy
        [False] * 5,  # layer 1 seed 1 training
        channels_only,
        channels_only,
    ]
    relaxed = action_mask(data, CATALOGUE, one_per_layer=False)
    assert relaxed[2].tolist() == features_only and not relaxed[3].any()


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("gnn", {}), ("random", {}), ("random", {"p_wait": 0.1}), ("heuristic", {})],
)
def test_probabilities_of_all_legal_actions_sum_to_one(name, kwargs):
    policy = create_policy(name, **kwargs)
    data = to_data(make_doc(loss_trend=0.0))
    dist = policy.distribution(data, CATALOGUE)
    logps = torch.stack([dist.log_prob(a) for a in _all_actions(data, CATALOGUE)])
    assert len(logps) == 1 + 4 * 3 + 2 * 1
    assert_close(logps.exp().sum(), torch.tensor(1.0))
    illegal = {"action": "germinate", "layer": "2", "seed": 0, "blueprint_index": 0}
    assert dist.log_prob(illegal) == -math.inf


def test_random_policy_logprobs_are_exact():
    data = to_data(_busy_doc())
    dist = RandomPolicy(p_wait=0.25).distribution(data, CATALOGUE)
    logp = dist.log_probs()
    assert_close(logp[0], torch.tensor(math.log(0.25)))
    legal = logp[1:][logp[1:].isfinite()]
    assert_close(legal, torch.full((5,), math.log(0.75 / 5)))


def test_gnn_evaluate_matches_decide_and_distribution():
    policy = GNNPolicy()
    data = to_data(make_doc())
    rng = torch.Generator().manual_seed(3)
    decisions = [policy.decide(data, CATALOGUE, rng=rng) for _ in range(12)]
    assert {d.action for d in decisions} == {"wait", "germinate"}
    actions = [d.as_action() for d in decisions]
    logps, entropy, values = policy.evaluate([data] * 12, [CATALOGUE] * 12, actions)
    assert_close(logps, torch.tensor([d.logprob for d in decisions]))
    dist = policy.distribution(data, CATALOGUE)
    assert_close(entropy, dist.entropy().detach().expand(12))
    assert_close(values, torch.full((12,), decisions[0].value))
    every = _all_actions(data, CATALOGUE)
    logps, _, _ = policy.evaluate([data] * len(every), [CATALOGUE] * len(every), every)
    assert_close(logps.exp().sum(), torch.tensor(1.0))
    assert logps.requires_grad


def test_gnn_evaluate_batches_graphs_of_different_shapes():
    policy = GNNPolicy()
    small = to_data(make_doc([make_layer("x", stages=("DORMANT",))]))
    big = to_data(_busy_doc())
    wait = {"action": "wait", "layer": None, "seed": None, "blueprint_index": None}
    grow = {"action": "germinate", "layer": "2", "seed": 1, "blueprint_index": 0}
    logps, _, _ = policy.evaluate([small, big], [CATALOGUE[:1], CATALOGUE], [wait, grow])
    assert logps[1] == -math.inf  # blueprint 0 is a features blueprint on a Conv2d layer
    assert_close(logps[0], policy.distribution(small, CATALOGUE[:1]).log_prob(wait))
    shared, _, _ = policy.evaluate(Batch.from_data_list([big, big]), CATALOGUE, [wait, wait])
    assert_close(shared, policy.distribution(big, CATALOGUE).log_prob(wait).expand(2))


def test_decisions_are_legal_and_reproducible_with_the_same_generator():
    data = to_data(_busy_doc())
    mask = action_mask(data, CATALOGUE)
    for policy in (GNNPolicy(), RandomPolicy()):
        first = [
            policy.decide(data, CATALOGUE, rng=torch.Generator().manual_seed(1)) for _ in range(3)
        ]
        again = policy.decide(data, CATALOGUE, rng=torch.Generator().manual_seed(1))
        assert first[0] == again
        rng = torch.Generator().manual_seed(2)
        for _ in range(40):
            d = policy.decide(data, CATALOGUE, rng=rng)
            if d.action == "germinate":
                n = data.node_layer.index(d.layer) + d.seed
                assert mask[n, d.blueprint_index]


def test_only_wait_is_legal_without_a_growable_site():
    data = to_data(make_doc([make_layer("0", stages=("FOSSILIZED", "CULLED"))]))
    for policy in (GNNPolicy(), RandomPolicy(p_wait=0.0), HeuristicPolicy()):
        decision = policy.decide(data, CATALOGUE, rng=torch.Generator().manual_seed(0))
        assert decision.action == "wait"
        assert decision.logprob == 0.0
    assert GNNPolicy().decide(data, [], rng=torch.Generator()).action == "wait"


def test_heuristic_grows_at_the_plateau_where_gradients_are_high_with_the_largest_blueprint():
    layers = [make_layer("0"), make_layer("1", grad_norm=3.0), make_layer("2", "Conv2d")]
    policy = HeuristicPolicy()
    rng = torch.Generator().manual_seed(0)
    plateau = to_data(make_doc(layers, loss_trend=0.001))
    d = policy.decide(plateau, CATALOGUE, rng=rng, greedy=True)
    assert (d.action, d.layer, d.seed, d.blueprint_index) == ("germinate", "1", 0, 0)
    assert d.logprob < 0  # a softmax with temperature: the logprob is exact, not 0
    falling = to_data(make_doc(layers, loss_trend=-0.2))  # still in the steep first descent
    d = policy.decide(falling, CATALOGUE, rng=rng)
    assert (d.action, d.logprob) == ("wait", 0.0)
    strict = HeuristicPolicy(temperature=0.0).decide(plateau, CATALOGUE, rng=rng)
    assert (strict.layer, strict.blueprint_index, strict.logprob) == ("1", 0, 0.0)
    slowing = to_data(make_doc(layers, loss_trend=-0.08))  # falling, but no longer steeply
    assert HeuristicPolicy(temperature=0.0).decide(slowing, CATALOGUE, rng=rng).layer == "1"


def test_save_and_load_give_identical_logits():
    policy = GNNPolicy(hidden=32, layers=3)
    data = to_data(_busy_doc())
    blob = policy.save_safetensors()
    assert blob[8:9] == b"{"  # safetensors: u64 header length, then a JSON header
    loaded = GNNPolicy.load_safetensors(blob, policy.config())
    assert loaded.config() == policy.config()
    with torch.no_grad():
        assert torch.equal(
            policy.distribution(data, CATALOGUE).logits, loaded.distribution(data, CATALOGUE).logits
        )
    with pytest.raises(ValueError, match="train a new policy version"):
        GNNPolicy.load_safetensors(blob, {**policy.config(), "feature_version": 0})
    with pytest.raises(ValueError, match="does not match its config"):
        GNNPolicy.load_safetensors(blob, {**policy.config(), "hidden": 64})


def test_new_catalogue_names_use_stable_hash_buckets():
    assert name_bucket("residual-mlp-small") == name_bucket("residual-mlp-small")
    assert name_bucket("residual-mlp-small") == 548
    unseen = [{**CATALOGUE[0], "id": "z", "name": "brand-new-blueprint"}]
    data = to_data(make_doc())
    assert GNNPolicy().decide(data, unseen, rng=torch.Generator(), greedy=True).policy == "gnn"


def test_blueprint_descriptors_are_validated_field_by_field():
    with pytest.raises(ValueError, match=r"blueprints\[1\]\.layout"):
        validate_blueprints([CATALOGUE[0], {**CATALOGUE[1], "layout": "rows"}])
    with pytest.raises(ValueError, match=r"blueprints\[0\]\.version: unknown field"):
        validate_blueprints([{**CATALOGUE[0], "version": 2}])
    with pytest.raises(ValueError, match=r"blueprints\[0\]\.graft: missing"):
        validate_blueprints([{"id": "a", "name": "a", "layout": "features"}])


def test_create_policy_builds_by_name_and_lists_names_on_error():
    assert isinstance(create_policy("gnn", hidden=16), GNNPolicy)
    assert isinstance(create_policy("random", p_wait=0.3), Policy)
    assert create_policy("heuristic").name == "heuristic"
    with pytest.raises(ValueError, match="choose one of gnn, heuristic, random"):
        create_policy("oracle")


def test_fits_is_anded_into_the_action_mask():
    data = to_data(make_doc())
    fits = _compilable(data)
    mask = action_mask(data, CATALOGUE, fits=fits)
    assert torch.equal(mask, action_mask(data, CATALOGUE) & fits)
    assert mask.sum() == 6  # layer "0": b and e on both seeds; Conv2d layer "2": c on both


@pytest.mark.parametrize(
    ("name", "kwargs"), [("gnn", {}), ("random", {"p_wait": 0.1}), ("heuristic", {})]
)
def test_pairs_the_server_cannot_compile_are_never_chosen_and_the_rest_sum_to_one(name, kwargs):
    policy = create_policy(name, **kwargs)
    data = to_data(make_doc(loss_trend=0.0))
    fits = _compilable(data)
    dist = policy.distribution(data, CATALOGUE, fits=fits)
    legal = _all_actions(data, CATALOGUE, fits=fits)
    assert len(legal) == 1 + 6
    assert_close(torch.stack([dist.log_prob(a) for a in legal]).exp().sum(), torch.tensor(1.0))
    refused = torch.nonzero(action_mask(data, CATALOGUE) & ~fits).tolist()
    assert len(refused) == 8
    for n, k in refused:
        assert dist.log_prob(_germinate(data, n, k)) == -math.inf
    rng = torch.Generator().manual_seed(0)
    decisions = [policy.decide(data, CATALOGUE, rng=rng, fits=fits) for _ in range(60)]
    decisions.append(policy.decide(data, CATALOGUE, rng=rng, greedy=True, fits=fits))
    grown = [d for d in decisions if d.action == "germinate"]
    assert grown
    for d in grown:
        assert fits[data.node_layer.index(d.layer) + d.seed, d.blueprint_index]
        assert_close(d.logprob, float(dist.log_prob(d.as_action()).detach()))


def test_gnn_evaluate_applies_each_graphs_own_fits():
    policy = GNNPolicy()
    data = to_data(make_doc())
    fits = _compilable(data)
    every = _all_actions(data, CATALOGUE)
    logps, _, _ = policy.evaluate([data] * len(every), CATALOGUE, every, fits=[fits] * len(every))
    dist = policy.distribution(data, CATALOGUE, fits=fits)
    assert_close(logps, torch.stack([dist.log_prob(a) for a in every]))
    assert int((logps == -math.inf).sum()) == 8
    assert_close(logps.exp().sum(), torch.tensor(1.0))
    wide = _germinate(data, 0, 0)  # 4096 parameters: over the server's limit
    mixed, _, _ = policy.evaluate([data, data], CATALOGUE, [wide, wide], fits=[None, fits])
    assert_close(mixed[0], policy.distribution(data, CATALOGUE).log_prob(wide))
    assert mixed[1] == -math.inf


def test_heuristic_picks_the_largest_blueprint_that_fits():
    layers = [make_layer("0"), make_layer("1", grad_norm=3.0), make_layer("2", "Conv2d")]
    plateau = to_data(make_doc(layers, loss_trend=0.001))
    fits = torch.ones(6, len(CATALOGUE), dtype=torch.bool)
    fits[:, 0] = False  # residual-mlp-wide, the largest, is over the budget everywhere
    rng = torch.Generator().manual_seed(0)
    d = HeuristicPolicy().decide(plateau, CATALOGUE, rng=rng, greedy=True, fits=fits)
    assert (d.action, d.layer, d.seed, d.blueprint_index) == ("germinate", "1", 0, 4)


@pytest.mark.parametrize(
    "fits",
    [torch.ones(6, 4, dtype=torch.bool), torch.ones(6, 5), [[True] * 5] * 6],
    ids=["wrong-shape", "float", "list"],
)
def test_a_malformed_fits_mask_is_refused_naming_the_field(fits):
    data = to_data(make_doc())
    with pytest.raises(ValueError, match=r"^fits: expected a torch.bool tensor of shape \[6, 5\]"):
        action_mask(data, CATALOGUE, fits=fits)
    for policy in (RandomPolicy(), HeuristicPolicy(), GNNPolicy()):
        with pytest.raises(ValueError, match=r"^fits: expected"):
            policy.decide(data, CATALOGUE, rng=torch.Generator(), fits=fits)
    with pytest.raises(ValueError, match=r"^fits\[1\]: expected a torch.bool tensor"):
        GNNPolicy().distributions([data, data], [CATALOGUE] * 2, fits=[None, fits])


def test_gnn_needs_one_fits_entry_per_graph():
    data = to_data(make_doc())
    with pytest.raises(ValueError, match=r"fits: expected a list of 2 masks"):
        GNNPolicy().evaluate([data, data], CATALOGUE, [WAIT, WAIT], fits=[None])


def test_the_gnn_module_can_be_imported_before_tamiyo_policy():
    code = "import tamiyo._gnn as g, tamiyo.policy as p; assert g.GNNPolicy is p.POLICIES['gnn']"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)


BRIDGED = [
    *CATALOGUE,
    {
        "id": "f",
        "name": "bridge-mlp-8",
        "graft": "bridge",
        "layout": "features",
        "params_estimate": 256,
    },
]


def _bridged_doc(**globals_over) -> dict:
    """Linear "0" feeds Linear "1" (a bridge site, reading "0"'s input); Conv2d "2"."""
    layers = [
        make_layer("0", grad_norm=3.0),
        make_layer("1", bridge_from="0"),
        make_layer("2", "Conv2d"),
    ]
    return make_doc(layers, **globals_over)


def test_bridge_blueprints_fit_only_layers_with_a_bridge_source():
    data = to_data(_bridged_doc())
    assert data.node_dims[:, 3].tolist() == [0, 0, 16, 16, 0, 0]  # "0" reads 16 features
    assert data.node_bridge_pos.tolist() == [-1, -1, 0, 0, -1, -1]
    mask = action_mask(data, BRIDGED)
    assert mask[:, 5].tolist() == [False, False, True, True, False, False]
    assert mask[:, :5].equal(action_mask(data, CATALOGUE))  # the rest is unchanged


def test_heuristic_widens_the_hidden_layer_of_a_high_pressure_layer_with_a_bridge():
    rng = torch.Generator().manual_seed(0)
    plateau = to_data(_bridged_doc(loss_trend=0.001))
    # Layer "0" has the gradient pressure; the bridge at "1" widens "0"'s output.
    d = HeuristicPolicy(temperature=0.0).decide(plateau, BRIDGED, rng=rng)
    assert (d.action, d.layer, d.seed, d.blueprint_index) == ("germinate", "1", 0, 5)
    # Without a bridge in the catalogue it grows "0" itself, with the largest that fits.
    d = HeuristicPolicy(temperature=0.0).decide(plateau, CATALOGUE, rng=rng)
    assert (d.action, d.layer, d.blueprint_index) == ("germinate", "0", 0)


def test_a_bridge_from_a_missing_layer_is_refused_naming_the_field():
    from tamiyo.graph import GraphError, validate_graph

    doc = _bridged_doc()
    doc["layers"][1]["bridge_from"] = "nope"
    with pytest.raises(GraphError, match=r"layers\[1\]\.bridge_from"):
        validate_graph(doc)
    doc["layers"][1]["bridge_from"] = "2"  # a Conv2d layer
    with pytest.raises(GraphError, match="features layout"):
        validate_graph(doc)
