import random

import pytest
import torch
from torch.testing import assert_close

from tamiyo.graph import to_data
from tamiyo.policy import GNNPolicy, RandomPolicy
from tamiyo.training import MIN_EXPERIENCES, evaluate_policy, train_policy
from tests.tamiyo.test_graph import make_doc, make_layer, make_seed

CATALOGUE = [
    {
        "id": "bp-a",
        "name": "residual-mlp-small",
        "graft": "residual",
        "layout": "features",
        "params_estimate": 600,
    },
    {
        "id": "bp-b",
        "name": "lowrank-parallel",
        "graft": "parallel",
        "layout": "features",
        "params_estimate": 300,
    },
    {
        "id": "bp-c",
        "name": "conv1x1-bottleneck",
        "graft": "residual",
        "layout": "channels",
        "params_estimate": 900,
    },
]
DIMS = [(16, 32), (32, 32), (32, 32), (32, 10)]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def random_state(r: random.Random) -> dict:
    """A 4-layer MLP snapshot with random telemetry; each seed is fossilized with p = 0.2."""
    layers = []
    for i, (n_in, n_out) in enumerate(DIMS):
        seeds = [
            make_seed(j, steps_in_stage=r.randint(0, 500))
            if r.random() < 0.8
            else make_seed(j, "FOSSILIZED", alpha=1.0, graft="residual", params=600)
            for j in range(2)
        ]
        activation = {
            "mean": r.gauss(0, 0.5),
            "std": r.uniform(0.2, 2),
            "dead_fraction": r.uniform(0, 0.5),
        }
        layers.append(
            make_layer(
                str(i),
                seeds=seeds,
                activation=activation,
                params=n_in * n_out,
                grad_norm=r.uniform(0.01, 2.0),
                **{"in": n_in, "out": n_out},
            )
        )
    doc = make_doc(
        layers,
        progress=r.random(),
        loss=r.uniform(0.1, 2),
        loss_trend=r.gauss(0, 0.01),
        val_metric=r.random(),
        val_trend=r.gauss(0, 0.01),
        budget_used=r.uniform(0, 0.5),
    )
    doc["step"] = r.randint(0, 5000)
    return doc


def env_reward(action: dict) -> float:
    """Growing at layer "1" pays +0.8, anywhere else -0.3; waiting pays 0."""
    if action["action"] == "wait":
        return 0.0
    return 0.8 if action["layer"] == "1" else -0.3


def collect(n: int, seed: int) -> list[dict]:
    r, rng = random.Random(seed), torch.Generator().manual_seed(seed)
    policy = RandomPolicy()
    out = []
    for _ in range(n):
        state = random_state(r)
        d = policy.decide(to_data(state), CATALOGUE, rng=rng)
        out.append(
            {
                "state": state,
                "blueprints": CATALOGUE,
                "action": d.as_action(),
                "behavior_logprob": d.logprob,
                "reward": env_reward(d.as_action()),
            }
        )
    return out


def grow_at_layer_1_rate(policy, *, greedy: bool, n: int = 150) -> float:
    r, rng = random.Random(99), torch.Generator().manual_seed(99)
    hits = 0
    for _ in range(n):
        d = policy.decide(to_data(random_state(r)), CATALOGUE, rng=rng, greedy=greedy)
        hits += d.action == "germinate" and d.layer == "1"
    return hits / n


def test_trained_gnn_learns_where_growth_pays_and_scores_higher_off_policy():
    experiences = collect(300, seed=1)
    result = train_policy(None, experiences, seed=0, epochs=15)
    m = result.metrics
    assert (m["train_count"], m["heldout_count"], m["skipped_illegal"]) == (240, 60, 0)
    random_rate = grow_at_layer_1_rate(RandomPolicy(), greedy=False)
    assert 0.08 < random_rate < 0.16
    assert grow_at_layer_1_rate(result.policy, greedy=True) > 0.8
    assert grow_at_layer_1_rate(result.policy, greedy=False) > 0.6
    held = [experiences[i] for i in result.heldout_indices]
    trained_score = evaluate_policy(result.policy, held)
    random_score = evaluate_policy(RandomPolicy(), held)
    assert_close(random_score, m["heldout_behavior_reward"])
    assert trained_score > 0.5 > 0.1 > random_score
    assert_close(m["heldout_score"], trained_score)
    assert len(m["history"]) == 15 and {"train_loss", "heldout_loss"} <= m["history"][-1].keys()


def test_importance_weights_reweight_the_behaviour_rewards():
    experiences = collect(40, seed=2)
    waits = [e["reward"] for e in experiences if e["action"]["action"] == "wait"]
    grows = [e["reward"] for e in experiences if e["action"]["action"] == "germinate"]
    # p_wait 0.2 vs the behaviour's 0.5: wait weighs 0.4, each (equally likely) growth 1.6
    expected = (0.4 * sum(waits) + 1.6 * sum(grows)) / (0.4 * len(waits) + 1.6 * len(grows))
    assert_close(evaluate_policy(RandomPolicy(p_wait=0.2), experiences), expected)
    on_policy = evaluate_policy(RandomPolicy(), experiences)
    assert_close(on_policy, sum(waits + grows) / len(experiences))


def test_training_is_deterministic_and_leaves_inputs_alone():
    experiences = collect(40, seed=3)
    start = GNNPolicy(hidden=16)
    before = {k: v.clone() for k, v in start.state_dict().items()}
    rng_state = torch.get_rng_state()
    a = train_policy(start, experiences, seed=7, epochs=2)
    b = train_policy(start, experiences, seed=7, epochs=2)
    assert torch.equal(torch.get_rng_state(), rng_state)
    for key, value in start.state_dict().items():
        assert torch.equal(value, before[key])
    for key, value in a.policy.state_dict().items():
        assert torch.equal(value, b.policy.state_dict()[key])
    assert a.heldout_indices == b.heldout_indices and len(a.heldout_indices) == 8
    drop = {"seconds"}
    assert {k: v for k, v in a.metrics.items() if k not in drop} == {
        k: v for k, v in b.metrics.items() if k not in drop
    }
    assert a.metrics["heldout_score_before"] is not None
    assert a.policy is not start and a.policy.config() == start.config()


def test_too_few_rewarded_experiences_are_refused():
    experiences = collect(MIN_EXPERIENCES + 3, seed=4)
    for e in experiences[:4]:
        e["reward"] = None
    with pytest.raises(ValueError, match="need at least 32 experiences with rewards, have 31"):
        train_policy(None, experiences, seed=0)


def test_malformed_experiences_are_named():
    experiences = collect(MIN_EXPERIENCES, seed=5)
    experiences[3]["state"]["layers"][0]["grad_norm"] = float("nan")
    with pytest.raises(ValueError, match=r"experiences\[3\]\.state\.layers\[0\]\.grad_norm"):
        train_policy(None, experiences, seed=0)
    experiences = collect(MIN_EXPERIENCES, seed=5)
    del experiences[5]["behavior_logprob"]
    with pytest.raises(ValueError, match=r"experiences\[5\]\.behavior_logprob: missing"):
        evaluate_policy(RandomPolicy(), experiences)
