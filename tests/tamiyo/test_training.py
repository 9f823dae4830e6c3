import math
import random

import pytest
import torch
from torch.testing import assert_close

from tamiyo.graph import to_data
from tamiyo.policy import GNNPolicy, HeuristicPolicy, RandomPolicy
from tamiyo.training import MIN_EXPERIENCES, evaluate_policy, train_policy
from tests.tamiyo._snapshots import make_doc, make_layer, make_seed

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


def compilable(state: dict) -> list[list[bool]]:
    """The server's feasibility mask: a blueprint compiles where its parameter count at the
    layer's width (``params_estimate · in / 16``) is at most 1000, so on the 32-wide layers
    only bp-b does."""
    return [
        [bp["params_estimate"] * layer["in"] / 16 <= 1000 for bp in CATALOGUE]
        for layer in state["layers"]
        for _ in layer["seeds"]
    ]


def collect(n: int, seed: int, *, with_fits: bool = False) -> list[dict]:
    r, rng = random.Random(seed), torch.Generator().manual_seed(seed)
    policy = RandomPolicy()
    out = []
    for _ in range(n):
        state = random_state(r)
        fits = compilable(state) if with_fits else None
        mask = None if fits is None else torch.tensor(fits)
        d = policy.decide(to_data(state), CATALOGUE, rng=rng, fits=mask)
        experience = {
            "state": state,
            "blueprints": CATALOGUE,
            "action": d.as_action(),
            "behavior_logprob": d.logprob,
            "reward": env_reward(d.as_action()),
        }
        if with_fits:
            experience["fits"] = fits
        out.append(experience)
    return out


def site(state: dict, action: dict) -> int:
    """The node index of an action's seed site in `to_data` order."""
    names = [layer["name"] for layer in state["layers"] for _ in layer["seeds"]]
    return names.index(action["layer"]) + action["seed"]


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


def test_without_reward_signal_the_policy_is_pulled_toward_the_heuristic():
    # The prior term is KL(heuristic ‖ π) on every training state: with nothing to learn
    # from the rewards, the trained policy ends nearer the heuristic than without it.
    experiences = collect(120, seed=11)
    for e in experiences:
        e["reward"] = 0.0
    r = random.Random(99)
    states = [to_data(random_state(r)) for _ in range(60)]
    heuristic = HeuristicPolicy()

    def distance(coef: float) -> float:
        policy = train_policy(None, experiences, seed=0, epochs=10, prior_coef=coef).policy
        total = 0.0
        with torch.no_grad():
            for data in states:
                p = policy.distribution(data, CATALOGUE).log_probs().exp()
                q = heuristic.distribution(data, CATALOGUE).log_probs().exp()
                total += 0.5 * float((p - q).abs().sum())
        return total / len(states)

    assert distance(0.1) < 0.7 * distance(0.0)
    with pytest.raises(ValueError, match="prior_coef must be finite and >= 0"):
        train_policy(None, experiences, seed=0, prior_coef=-1.0)


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


def test_training_and_evaluation_use_the_fits_mask_the_behaviour_policy_saw():
    experiences = collect(40, seed=6, with_fits=True)
    experiences[0]["fits"] = None  # null: everything compiled
    experiences[0]["behavior_logprob"] = float(
        RandomPolicy()
        .distribution(to_data(experiences[0]["state"]), CATALOGUE)
        .log_prob(experiences[0]["action"])
    )
    mean = sum(e["reward"] for e in experiences) / len(experiences)
    # On-policy, every importance weight is exactly 1 only if fits renormalises as it did
    assert_close(evaluate_policy(RandomPolicy(), experiences), mean)
    stripped = [{k: v for k, v in e.items() if k != "fits"} for e in experiences]
    assert abs(evaluate_policy(RandomPolicy(), stripped) - mean) > 1e-3
    result = train_policy(None, experiences, seed=0, epochs=2)
    m = result.metrics
    assert (m["train_count"], m["heldout_count"], m["skipped_illegal"]) == (32, 8, 0)
    assert m["heldout_score"] is not None and math.isfinite(m["heldout_loss"])
    # Every stored action is legal either way, so only the loss's log-probabilities differ
    unmasked = train_policy(None, stripped, seed=0, epochs=2).metrics
    assert unmasked["skipped_illegal"] == 0
    assert abs(unmasked["history"][0]["train_loss"] - m["history"][0]["train_loss"]) > 1e-4
    r, rng = random.Random(5), torch.Generator().manual_seed(5)
    for _ in range(20):
        state = random_state(r)
        fits = torch.tensor(compilable(state))
        d = result.policy.decide(to_data(state), CATALOGUE, rng=rng, fits=fits)
        assert d.action == "wait" or fits[site(state, d.as_action()), d.blueprint_index]


def test_an_action_the_server_could_not_compile_is_skipped_like_any_illegal_action():
    experiences = collect(40, seed=7)
    grows = [i for i, e in enumerate(experiences) if e["action"]["action"] == "germinate"]
    by_fits, by_layout = grows[:3], grows[3:5]
    for i in by_fits:
        e = experiences[i]
        fits = [[True] * len(CATALOGUE) for _ in range(8)]
        fits[site(e["state"], e["action"])][e["action"]["blueprint_index"]] = False
        e["fits"] = fits
    for i in by_layout:
        experiences[i]["action"]["blueprint_index"] = 2  # a channels blueprint on nn.Linear
    result = train_policy(None, experiences, seed=0, epochs=1, heldout_fraction=0.0)
    assert (result.metrics["train_count"], result.metrics["skipped_illegal"]) == (35, 5)
    legal = [e for i, e in enumerate(experiences) if i not in by_fits + by_layout]
    for policy in (RandomPolicy(), result.policy):
        assert_close(evaluate_policy(policy, experiences), evaluate_policy(policy, legal))


def test_malformed_fits_masks_are_named():
    experiences = collect(MIN_EXPERIENCES, seed=5, with_fits=True)
    experiences[2]["fits"] = experiences[2]["fits"][:7]
    with pytest.raises(ValueError, match=r"experiences\[2\]\.fits: expected 8 rows"):
        train_policy(None, experiences, seed=0)
    experiences[2]["fits"].append([True, 1, False])
    with pytest.raises(ValueError, match=r"experiences\[2\]\.fits\[7\]: expected booleans"):
        evaluate_policy(RandomPolicy(), experiences)
    experiences[2]["fits"][7] = [True, False]
    with pytest.raises(ValueError, match=r"experiences\[2\]\.fits\[7\]: expected 3 booleans"):
        evaluate_policy(RandomPolicy(), experiences)


@pytest.mark.django_db
def test_a_version_whose_scores_could_not_be_computed_stores_null_not_nan():
    from tamiyo import services
    from tamiyo.models import PolicyVersion
    from tamiyo.policy import GNNPolicy

    metrics = {"heldout_score_candidate": math.nan, "history": [{"loss": math.inf}], "n": 3}
    version = services.policy_version_create(
        policy=GNNPolicy(), metrics=metrics, experience_count=0, activate=False
    )
    stored = PolicyVersion.objects.get(pk=version.pk).metrics
    assert stored == {"heldout_score_candidate": None, "history": [{"loss": None}], "n": 3}


def test_terminal_credit_teaches_what_paid_at_the_end_when_the_step_reward_misleads():
    """Growing at layer "1" measures well at probation (+0.8) but its runs end lower; growing at
    "2" measures modestly (+0.2) and its runs end higher. Trained on the step rewards alone,
    the policy prefers "1"; with each run's ending credited back, it prefers "2"."""
    from tamiyo.reward import terminal_credit

    def final(action: dict) -> float:
        if action["action"] == "germinate" and action["layer"] in ("1", "2"):
            return {"1": 0.90, "2": 0.96}[action["layer"]]
        return 0.93

    experiences = collect(300, seed=3)
    for i, e in enumerate(experiences):  # one decision per run, all runs of the same model
        grew = e["action"]["action"] == "germinate"
        e["reward"] = {"1": 0.8, "2": 0.2}.get(e["action"]["layer"], -0.3) if grew else 0.0
        e.update(run=f"run-{i}", cohort="mlp", final_metric=final(e["action"]))
    credited, summary = terminal_credit(experiences)
    grew = sum(e["action"]["action"] == "germinate" for e in experiences)
    assert summary["credited"] == summary["runs"] == grew > 100

    def rates(exps) -> tuple[float, float]:
        policy = train_policy(None, exps, seed=0, epochs=15, prior_coef=0.0).policy
        r, rng = random.Random(5), torch.Generator().manual_seed(5)
        hits = {"1": 0, "2": 0}
        for _ in range(100):
            d = policy.decide(to_data(random_state(r)), CATALOGUE, rng=rng, greedy=True)
            if d.action == "germinate" and d.layer in hits:
                hits[d.layer] += 1
        return hits["1"], hits["2"]

    step_only = rates(experiences)
    with_ending = rates(credited)
    assert step_only[0] > 2 * step_only[1], step_only
    assert with_ending[1] > 2 * with_ending[0], with_ending
