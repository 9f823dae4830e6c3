"""Extreme inputs, diverged policies, and concurrent writes never turn into a 500 or lost data."""

import copy
import hashlib
import math

import pytest
import torch

from tamiyo import feasibility, services
from tamiyo.graph import FEATURE_LIMIT, GLOBAL_FEATURES, NODE_FEATURES, to_data
from tamiyo.models import Experience, PolicyVersion, TrainingRun
from tamiyo.policy import GNNPolicy
from tamiyo.services import decisions, outcomes, policies
from tamiyo.training import TrainResult
from tests.tamiyo._runtime import graph_doc, health_snapshot
from urza.errors import ApplicationError

pytestmark = [pytest.mark.django_db]

EXTREME_GLOBALS = [
    {"loss_trend": 1e307},
    {"loss_trend": -1.7e308},
    {"val_trend": 1e307},
    {"val_trend": -1.7e308},
    {"loss": 1.7e308, "val_metric": -1.7e308},
    {"budget_used": 3e38},
    {"budget_used": 1.7e308},
]


@pytest.fixture(scope="module")
def health():
    return health_snapshot()


def _extreme_layers(doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    for layer in doc["layers"]:
        layer["activation"] = {"mean": -1.7e308, "std": 1.7e308, "dead_fraction": 1.0}
        layer["grad_norm"] = 1.7e308
        layer["params"] = 2**53
        for seed in layer["seeds"]:
            seed["steps_in_stage"] = 2**53
            seed["errors"] = 2**53
            seed["params"] = 2**53
    return doc


def _nan_policy() -> GNNPolicy:
    policy = GNNPolicy()
    with torch.no_grad():
        next(policy.parameters()).fill_(math.nan)
    return policy


def _store_version(policy: GNNPolicy, *, active: bool) -> PolicyVersion:
    """A version as an older build (before the weights check) could have stored it."""
    from django.core.files.base import ContentFile

    data = policy.save_safetensors()
    version = PolicyVersion(
        version=(PolicyVersion.objects.count() + 1),
        config=policy.config(),
        checkpoint_sha256=hashlib.sha256(data).hexdigest(),
        metrics={"train_loss": None},
        experience_count=0,
        is_active=active,
    )
    version.checkpoint.save("policy.safetensors", ContentFile(data), save=False)
    if active:
        PolicyVersion.objects.filter(is_active=True).update(is_active=False)
    version.save()
    policies._policy_cache.clear()
    return version


# -- 1: features are finite and bounded ----------------------------------------------------
@pytest.mark.parametrize("extreme", EXTREME_GLOBALS)
def test_extreme_finite_inputs_give_finite_bounded_features(health, extreme):
    data = to_data(_extreme_layers(graph_doc(health, **extreme)))
    for tensor in (data.x, data.u):
        assert torch.isfinite(tensor).all()
        assert tensor.abs().max() <= FEATURE_LIMIT
    u = dict(zip(GLOBAL_FEATURES, data.u[0].tolist(), strict=True))
    for name, value in extreme.items():
        # the sign survives the clamp; a huge value reads as the limit
        assert math.copysign(1.0, u[name]) == math.copysign(1.0, value)
        assert abs(u[name]) == FEATURE_LIMIT or name == "loss"
    x = dict(zip(NODE_FEATURES, data.x[0].tolist(), strict=True))
    assert x["act_mean"] == -FEATURE_LIMIT and x["log_grad_norm"] == FEATURE_LIMIT


def test_ordinary_features_are_not_changed_by_the_bounds(health):
    data = to_data(graph_doc(health, loss=0.9, loss_trend=-0.03, budget_used=0.25))
    u = dict(zip(GLOBAL_FEATURES, data.u[0].tolist(), strict=True))
    assert u["loss"] == pytest.approx(math.log1p(0.9))
    assert u["loss_trend"] == pytest.approx(-math.log1p(3.0))
    assert u["budget_used"] == pytest.approx(0.25)


@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("extreme", EXTREME_GLOBALS)
def test_a_gnn_decision_on_extreme_numbers_is_answered_not_a_500(
    api_client, health, catalogue, extreme, greedy
):
    version = services.policy_version_create(
        policy=GNNPolicy(), metrics={}, experience_count=0, activate=True
    )
    run = api_client.post("/api/v1/runs/", {"name": "r"}, format="json").json()
    doc = _extreme_layers(graph_doc(health, **extreme))
    response = api_client.post(
        f"/api/v1/runs/{run['id']}/decisions/", {"graph": doc, "greedy": greedy}, format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    # the GNN itself decided (no fallback was needed) from a proper distribution
    assert body["policy"] == "gnn" and body["policy_version"] == version.version
    assert math.isfinite(body["logprob"]) and body["logprob"] <= 0
    experience = Experience.objects.get(pk=body["experience"])
    # stored as sent (Postgres' JSONB writes a number like 1e307 out in full, so compare as
    # numbers)
    stored = experience.state["globals"]
    assert stored.keys() == doc["globals"].keys()
    for key, sent in doc["globals"].items():
        assert float(stored[key]) == pytest.approx(sent), key


# -- 2: non-finite policies are never kept nor activated -----------------------------------
def test_training_that_diverged_keeps_no_version():
    policy = _nan_policy()
    with pytest.raises(services.TrainingDiverged) as info:
        policies._check_trained(TrainResult(policy, {"train_loss": math.nan}, []))
    assert info.value.code == "training_diverged" and "diverged" in info.value.message
    # finite weights but a NaN loss: refused as well
    with pytest.raises(services.TrainingDiverged):
        policies._check_trained(TrainResult(GNNPolicy(), {"train_loss": math.inf}, []))
    policies._check_trained(TrainResult(GNNPolicy(), {"train_loss": 0.5}, []))  # fine
    with pytest.raises(ApplicationError) as info:
        services.policy_version_create(policy=policy, metrics={}, experience_count=0, activate=True)
    assert info.value.status == 409 and info.value.code == "policy_unusable"
    assert not PolicyVersion.objects.exists()


def test_a_version_with_non_finite_weights_is_not_activated_and_decisions_fall_back(
    staff_client, health, catalogue
):
    good = services.policy_version_create(
        policy=GNNPolicy(), metrics={}, experience_count=0, activate=True
    )
    bad = _store_version(_nan_policy(), active=False)
    response = staff_client.post(f"/api/v1/policies/{bad.version}/activate/")
    assert response.status_code == 409, response.content
    error = response.json()["error"]
    assert error["code"] == "policy_unusable" and "non-finite weights" in error["message"]
    assert PolicyVersion.objects.get(is_active=True).pk == good.pk

    with pytest.raises(ApplicationError) as info:
        services.policy_load(version=bad)
    assert info.value.status == 409

    _store_version(_nan_policy(), active=True)  # already active (stored by an older build)
    run = staff_client.post("/api/v1/runs/", {"name": "r"}, format="json").json()
    for greedy in (False, True):
        response = staff_client.post(
            f"/api/v1/runs/{run['id']}/decisions/",
            {"graph": graph_doc(health), "greedy": greedy},
            format="json",
        )
        assert response.status_code == 201, response.content
        assert response.json()["policy"] == "heuristic"


# -- 3: outcomes ---------------------------------------------------------------------------
GERMINATE_OUTCOME = {
    "final_stage": "FOSSILIZED",
    "contribution": 0.02,
    "metric_before": 0.7,
    "metric_after": 0.72,
    "params_added": 100,
    "failures": 0,
    "rolled_back": False,
}


@pytest.fixture
def germinated(health, catalogue, user):
    run = services.run_create(
        name="r", model_summary={}, config={"param_budget": 10000}, owner=user
    )
    experience = services.decision_make(
        run=run, graph=graph_doc(health), policy_name="heuristic", greedy=True
    )
    assert experience.action["action"] == "germinate"
    return experience


def test_an_outcome_that_lost_the_race_to_a_different_one_is_refused(germinated):
    stale = Experience.objects.get(pk=germinated.pk)  # read before the other report landed
    winner = {**GERMINATE_OUTCOME, "metric_after": 0.75}
    services.experience_record_outcome(
        experience=Experience.objects.get(pk=germinated.pk), outcome=winner
    )
    assert stale.outcome is None
    with pytest.raises(ApplicationError) as info:
        services.experience_record_outcome(experience=stale, outcome=GERMINATE_OUTCOME)
    assert info.value.status == 409 and info.value.code == "outcome_exists"
    assert Experience.objects.get(pk=germinated.pk).outcome == winner

    # the same outcome sent twice at once: the loser is a retry and gets the experience
    stale = Experience.objects.get(pk=germinated.pk)
    stale.outcome = None
    kept = services.experience_record_outcome(experience=stale, outcome=dict(winner))
    assert kept.outcome == winner


@pytest.mark.parametrize(
    ("key", "loose"), [("rolled_back", 0), ("failures", False), ("params_added", 100.0)]
)
def test_a_repeat_is_compared_strictly_not_with_python_equality(api_client, germinated, key, loose):
    url = f"/api/v1/experiences/{germinated.pk}/"
    first = api_client.patch(url, {"outcome": GERMINATE_OUTCOME}, format="json")
    assert first.status_code == 200, first.content
    assert loose == GERMINATE_OUTCOME[key]  # Python's loose equality would call it a repeat
    response = api_client.patch(url, {"outcome": {**GERMINATE_OUTCOME, key: loose}}, format="json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert "outcome" in error["detail"] and key in error["message"]
    assert api_client.patch(url, {"outcome": GERMINATE_OUTCOME}, format="json").status_code == 200
    assert Experience.objects.get(pk=germinated.pk).outcome == GERMINATE_OUTCOME


def test_strict_json_equality():
    same = outcomes._same_json
    assert same({"a": [1, 0.5, None, "x", True]}, {"a": [1.0, 0.5, None, "x", True]})
    assert not same(False, 0) and not same(0, False) and not same(True, 1)
    assert not same({"a": 1}, {"a": 1, "b": 2}) and not same([1], [1, 1]) and not same("1", 1)


# -- 4: run updates ------------------------------------------------------------------------
def test_run_update_works_on_the_fresh_row_not_the_stale_object():
    run = services.run_create(name="r", model_summary={}, config={})
    stale = TrainingRun.objects.get(pk=run.pk)
    services.run_update(run=TrainingRun.objects.get(pk=run.pk), metrics={"a": 1})
    merged = services.run_update(run=stale, metrics={"b": 2})
    assert merged.metrics == {"a": 1, "b": 2}
    assert TrainingRun.objects.get(pk=run.pk).metrics == {"a": 1, "b": 2}

    stale = TrainingRun.objects.get(pk=run.pk)
    services.run_update(run=TrainingRun.objects.get(pk=run.pk), status="finished")
    assert stale.status == "running"
    with pytest.raises(ApplicationError) as info:
        services.run_update(run=stale, status="failed", metrics={"c": 3})
    assert info.value.status == 409 and info.value.code == "run_finished"
    fresh = TrainingRun.objects.get(pk=run.pk)
    assert fresh.status == "finished" and fresh.metrics == {"a": 1, "b": 2}


# -- 5: per-owner access -------------------------------------------------------------------
def _client_for(user):
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def test_users_see_and_act_only_on_their_own_runs_and_staff_see_all(
    api_client, user, django_user_model, health, catalogue
):
    other = _client_for(django_user_model.objects.create_user(username="b", password="pw-b-123"))
    staff_user = django_user_model.objects.create_user(
        username="ops", password="pw-ops-123", is_staff=True
    )
    staff = _client_for(staff_user)
    mine = api_client.post("/api/v1/runs/", {"name": "a-run"}, format="json").json()
    theirs = other.post("/api/v1/runs/", {"name": "b-run"}, format="json").json()
    decided = api_client.post(
        f"/api/v1/runs/{mine['id']}/decisions/",
        {"graph": graph_doc(health), "policy": "heuristic"},
        format="json",
    )
    assert decided.status_code == 201, decided.content
    experience = decided.json()["experience"]
    outcome = (
        GERMINATE_OUTCOME
        if decided.json()["action"] == "germinate"
        else {"metric_before": 0.7, "metric_after": 0.71}
    )

    run_url, exp_url = f"/api/v1/runs/{mine['id']}/", f"/api/v1/experiences/{experience}/"
    refused = [
        other.get(run_url),
        other.patch(run_url, {"status": "failed", "metrics": {"x": 1}}, format="json"),
        other.post(f"{run_url}decisions/", {"graph": graph_doc(health)}, format="json"),
        other.get(exp_url),
        other.patch(exp_url, {"outcome": outcome}, format="json"),
    ]
    for response in refused:
        assert response.status_code == 404, response.content
        assert response.json()["error"]["code"] == "not_found"
    fresh = TrainingRun.objects.get(pk=mine["id"])
    assert fresh.status == "running" and fresh.metrics == {}
    assert fresh.experiences.count() == 1
    assert Experience.objects.get(pk=experience).outcome is None

    def names(client):
        return {r["name"] for r in client.get("/api/v1/runs/").json()["results"]}

    assert names(api_client) == {"a-run"} and names(other) == {"b-run"}
    assert names(staff) == {"a-run", "b-run"}
    assert staff.get(run_url).status_code == 200
    assert staff.get(f"/api/v1/runs/{theirs['id']}/").status_code == 200
    assert staff.get(exp_url).status_code == 200
    assert api_client.get(f"/api/v1/runs/{theirs['id']}/").status_code == 404
    assert api_client.patch(exp_url, {"outcome": outcome}, format="json").status_code == 200


# -- decision cost: feasibility queries nothing per (seed site, blueprint) pair -------------
def test_feasibility_takes_each_ir_from_the_blueprints_given(catalogue, django_assert_num_queries):
    from urza.models import Blueprint

    blueprints = list(Blueprint.objects.filter(status="active"))
    layers = [
        {
            "name": f"l{i}",
            "type": "Linear",
            "layout": "features",
            "in": 100 + i,
            "out": 101 + i,
            "bridge_from": f"l{i - 1}" if i else None,
            "seeds": [{}],
        }
        for i in range(20)
    ]
    feasibility.kernel_params.cache_clear()
    with django_assert_num_queries(0):
        fits, estimates = decisions.feasibility(
            doc={"layers": layers}, blueprints=blueprints, dtype="float32"
        )
    assert len(fits) == 20 and all(any(row) for row in fits)
    bridges = [k for k, b in enumerate(blueprints) if b.ir["graft"] == "bridge"]
    assert bridges and not any(fits[0][k] for k in bridges)  # l0 has no bridge source
    assert all(fits[1][k] for k in bridges)
    assert all(e is None or e > 0 for e in estimates)
