import math

import pytest

from tamiyo.models import Experience, PolicyVersion, TrainingRun
from tests.tamiyo._runtime import graph_doc, health_snapshot

pytestmark = [pytest.mark.django_db]


@pytest.fixture(scope="module")
def health():
    return health_snapshot()


@pytest.fixture
def run(api_client):
    response = api_client.post(
        "/api/v1/runs/", {"name": "test-run", "config": {"param_budget": 10000}}, format="json"
    )
    assert response.status_code == 201, response.content
    return response.json()


def _error(response):
    body = response.json()
    assert set(body["error"]) == {"code", "message", "detail"}
    return body["error"]


def _reads(doc: dict, layer: dict, graft: str) -> int:
    """The width a seed of `layer` reads: a bridge reads the input of the layer feeding it."""
    if graft != "bridge":
        return layer["in"]
    return next(la["in"] for la in doc["layers"] if la["name"] == layer["bridge_from"])


def _decide(api_client, run, doc, **extra):
    return api_client.post(
        f"/api/v1/runs/{run['id']}/decisions/", {"graph": doc, **extra}, format="json"
    )


@pytest.mark.fast
def test_a_decision_is_recorded_with_state_action_and_behaviour_logprob(
    api_client, run, health, catalogue
):
    response = _decide(api_client, run, graph_doc(health), policy="random")
    assert response.status_code == 201, response.content
    body = response.json()
    experience = Experience.objects.get(pk=body["experience"])
    assert experience.policy_name == "random" and experience.policy_version is None
    assert experience.state["layers"][0]["name"] == "0"
    assert math.isfinite(body["logprob"]) and body["logprob"] <= 0
    assert experience.behavior_logprob == body["logprob"]
    if body["action"] == "germinate":
        assert body["kernel"] and body["blueprint"] and body["layer"] in {"0", "2", "4", "6"}
        assert str(experience.kernel_id) == body["kernel"]
    else:
        assert body["kernel"] is None and body["layer"] is None


def test_a_bridge_decision_requests_a_kernel_reading_the_source_layers_input(
    api_client, run, health, catalogue
):
    from urza.models import Kernel

    doc = graph_doc(health)  # at a plateau; layers "2", "4", "6" are fed by "0", "2", "4"
    assert [la["bridge_from"] for la in doc["layers"]] == [None, "0", "2", "4"]
    for _ in range(20):  # the heuristic samples (temperature 0.25); bridges score highest
        body = _decide(api_client, run, doc, policy="heuristic").json()
        kernel = Kernel.objects.get(pk=body["kernel"]) if body["kernel"] else None
        if kernel is not None and kernel.signature["graft"] == "bridge":
            break
    else:
        pytest.fail("the heuristic never chose a bridge at a plateau")
    layer = next(la for la in doc["layers"] if la["name"] == body["layer"])
    source = next(la for la in doc["layers"] if la["name"] == layer["bridge_from"])
    assert (kernel.signature["in"], kernel.signature["out"]) == (source["in"], layer["out"])


def test_a_greedy_decision_takes_the_most_likely_action_and_records_probability_one(
    api_client, run, health, catalogue
):
    doc = graph_doc(health)  # at a plateau: several (site, blueprint) pairs are legal
    sampled = _decide(api_client, run, doc, policy="heuristic").json()
    assert sampled["action"] == "germinate" and sampled["logprob"] < 0
    answers = [_decide(api_client, run, doc, policy="heuristic", greedy=True) for _ in range(3)]
    assert all(a.status_code == 201 for a in answers), answers[0].content
    bodies = [a.json() for a in answers]
    assert {(b["action"], b["layer"], b["blueprint"]) for b in bodies} == {
        (bodies[0]["action"], bodies[0]["layer"], bodies[0]["blueprint"])
    }
    assert bodies[0]["action"] == "germinate" and all(b["logprob"] == 0.0 for b in bodies)
    assert Experience.objects.get(pk=bodies[0]["experience"]).behavior_logprob == 0.0


@pytest.mark.fast
def test_greedy_must_be_a_boolean_and_means_nothing_for_the_random_policy(
    api_client, run, health, catalogue
):
    before = Experience.objects.count()
    response = _decide(api_client, run, graph_doc(health), greedy="maybe")
    assert response.status_code == 400
    assert "greedy" in _error(response)["detail"]
    response = _decide(api_client, run, graph_doc(health), policy="random", greedy=True)
    assert response.status_code == 400
    assert "random policy has no most likely action" in str(_error(response)["detail"])
    assert Experience.objects.count() == before  # nothing recorded for a bad request


def test_cold_start_decisions_use_the_heuristic_policy(api_client, run, health, catalogue):
    body = _decide(api_client, run, graph_doc(health)).json()
    assert body["policy"] == "heuristic" and body["policy_version"] is None


@pytest.mark.fast
def test_germinate_decisions_never_pick_a_blueprint_that_does_not_fit(
    api_client, run, health, catalogue
):
    for _ in range(25):
        body = _decide(api_client, run, graph_doc(health), policy="random").json()
        if body["action"] == "germinate":
            from urza.models import Blueprint

            blueprint = Blueprint.objects.get(pk=body["blueprint"])
            assert blueprint.ir["layout"] == "features"


def test_descriptors_carry_each_blueprints_mean_kernel_size_over_the_layers(
    api_client, run, health, catalogue
):
    from urza import services as urza_services
    from urza.models import Blueprint

    doc = graph_doc(health)
    body = _decide(api_client, run, doc, policy="heuristic").json()
    experience = Experience.objects.get(pk=body["experience"])
    for descriptor in experience.blueprints:
        ir = Blueprint.objects.get(pk=descriptor["id"]).ir
        if descriptor["layout"] == "channels":  # these layers are Linear: it fits none
            assert descriptor["params_estimate"] is None
            continue
        sizes = [
            urza_services.kernel_param_count(
                ir=ir,
                signature={
                    "graft": descriptor["graft"],
                    "layout": "features",
                    "in": _reads(doc, layer, descriptor["graft"]),
                    "out": layer["out"],
                    "dtype": "float32",
                },
            )
            for layer in doc["layers"]
            if descriptor["graft"] != "bridge" or layer["bridge_from"] is not None
        ]
        assert sizes, descriptor
        assert descriptor["params_estimate"] == round(sum(sizes) / len(sizes))


def test_germinate_decisions_stay_within_the_runs_remaining_parameter_budget(
    api_client, health, catalogue
):
    from urza import services as urza_services
    from urza.models import Blueprint, Kernel

    response = api_client.post(
        "/api/v1/runs/", {"name": "tight", "config": {"param_budget": 2000}}, format="json"
    )
    run = response.json()
    for used in (0.0, 0.9, 1.0):
        left = 2000 * (1 - used)
        germinated = 0
        for _ in range(25):
            doc = graph_doc(health, budget_used=used)
            body = _decide(api_client, run, doc, policy="random").json()
            experience = Experience.objects.get(pk=body["experience"])
            sites = [(la, s) for la in doc["layers"] for s in la["seeds"]]
            blueprints = list(
                Blueprint.objects.filter(pk__in=[b["id"] for b in experience.blueprints])
            )
            by_id = {str(b.pk): b for b in blueprints}
            for (layer, _seed), row in zip(sites, experience.fits, strict=True):
                for descriptor, fits in zip(experience.blueprints, row, strict=True):
                    if not fits:
                        continue  # every pair offered to the policy fits in what is left
                    signature = {
                        "graft": descriptor["graft"],
                        "layout": layer["layout"],
                        "in": _reads(doc, layer, descriptor["graft"]),
                        "out": layer["out"],
                        "dtype": "float32",
                    }
                    ir = by_id[descriptor["id"]].ir
                    params = urza_services.kernel_param_count(ir=ir, signature=signature)
                    assert params <= left
            if body["action"] == "germinate":
                germinated += 1
                kernel = Kernel.objects.get(pk=body["kernel"])
                ir = kernel.blueprint.ir
                assert urza_services.kernel_param_count(ir=ir, signature=kernel.signature) <= left
        if used == 0.0:
            assert germinated > 0
        elif used == 1.0:  # the budget is spent: nothing is offered, every decision waits
            assert not any(any(row) for row in experience.fits) and germinated == 0


@pytest.mark.parametrize(
    "mutate, field",
    [
        (
            lambda d: d["layers"][0]["activation"].update(std=float("nan")),
            "graph.layers[0].activation.std",
        ),
        (lambda d: d["layers"][1].pop("out"), "graph.layers[1].out"),
        (lambda d: d["globals"].update(colour=1), "graph.globals.colour"),
    ],
    ids=["nan", "missing", "extra"],
)
def test_a_bad_graph_gets_400_naming_the_field_and_records_nothing(
    api_client, run, health, catalogue, mutate, field
):
    import copy
    import json

    doc = copy.deepcopy(graph_doc(health))
    mutate(doc)
    payload = json.dumps({"graph": doc}, allow_nan=True)
    response = api_client.post(
        f"/api/v1/runs/{run['id']}/decisions/", payload, content_type="application/json"
    )
    assert response.status_code == 400, response.content
    error = _error(response)
    if field.endswith(".std"):  # NaN is not JSON: the parser refuses the body outright
        assert error["code"] == "parse_error" and "NaN" in error["message"]
    else:
        assert field in error["detail"], error
    assert not Experience.objects.exists()


def test_decisions_for_an_unknown_or_finished_run_are_refused(api_client, run, health):
    unknown = api_client.post(
        "/api/v1/runs/00000000-0000-0000-0000-000000000000/decisions/",
        {"graph": graph_doc(health)},
        format="json",
    )
    assert unknown.status_code == 404
    finished = api_client.patch(f"/api/v1/runs/{run['id']}/", {"status": "finished"}, format="json")
    assert finished.status_code == 200 and finished.json()["status"] == "finished"
    refused = _decide(api_client, run, graph_doc(health))
    assert refused.status_code == 409 and _error(refused)["code"] == "run_finished"
    again = api_client.patch(f"/api/v1/runs/{run['id']}/", {"status": "running"}, format="json")
    assert again.status_code == 409
    assert TrainingRun.objects.get(pk=run["id"]).status == "finished"


def test_an_outcome_gets_a_reward_once(api_client, run, health, catalogue):
    body = _decide(api_client, run, graph_doc(health), policy="heuristic").json()
    if body["action"] == "germinate":
        outcome = {
            "final_stage": "FOSSILIZED",
            "contribution": 0.02,
            "metric_before": 0.7,
            "metric_after": 0.72,
            "params_added": 1000,
            "failures": 0,
            "rolled_back": False,
        }
        expected = math.tanh(20 * (0.02 - 0.005 * 1000 / 10000))
    else:
        outcome = {"metric_before": 0.70, "metric_after": 0.71}
        expected = math.tanh(20 * 0.01)
    url = f"/api/v1/experiences/{body['experience']}/"
    response = api_client.patch(url, {"outcome": outcome}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["reward"] == pytest.approx(expected)
    retried = api_client.patch(url, {"outcome": outcome}, format="json")
    assert retried.status_code == 200 and retried.json()["reward"] == pytest.approx(expected)
    other = api_client.patch(url, {"outcome": {**outcome, "metric_after": 0.1}}, format="json")
    assert other.status_code == 409


def test_an_invalid_outcome_gets_400_and_no_reward(api_client, run, health, catalogue):
    body = _decide(api_client, run, graph_doc(health), policy="heuristic").json()
    url = f"/api/v1/experiences/{body['experience']}/"
    response = api_client.patch(url, {"outcome": {"metric_before": "high"}}, format="json")
    assert response.status_code == 400
    assert "outcome" in _error(response)["detail"]
    assert Experience.objects.get(pk=body["experience"]).reward is None


def test_training_with_too_few_experiences_is_refused(api_client):
    response = api_client.post("/api/v1/policies/train/", {}, format="json")
    assert response.status_code == 400
    assert "at least 32" in _error(response)["message"]


def test_no_active_policy_is_a_clear_404(api_client):
    response = api_client.get("/api/v1/policies/active/")
    assert response.status_code == 404
    assert "heuristic" in _error(response)["message"]
    assert api_client.get("/api/v1/policies/").json()["count"] == 0


def test_runs_and_experiences_are_browsable_in_the_admin(
    admin_client, api_client, run, health, catalogue
):
    body = _decide(api_client, run, graph_doc(health), policy="random").json()
    page = admin_client.get("/admin/tamiyo/experience/", {"q": "test-run"})
    assert page.status_code == 200 and body["experience"] in page.content.decode()
    assert (
        admin_client.get(f"/admin/tamiyo/experience/{body['experience']}/change/").status_code
        == 200
    )
    assert admin_client.get(f"/admin/tamiyo/trainingrun/{run['id']}/change/").status_code == 200
    assert admin_client.get("/admin/tamiyo/policyversion/").status_code == 200


def _version(activate: bool):
    from tamiyo import services
    from tamiyo.policy import GNNPolicy

    return services.policy_version_create(
        policy=GNNPolicy(), metrics={}, experience_count=0, activate=activate
    )


def test_staff_can_pin_a_policy_version_and_decisions_use_it(staff_client, run, health, catalogue):
    first, second = _version(activate=True), _version(activate=False)
    assert _decide(staff_client, run, graph_doc(health)).json()["policy_version"] == 1

    response = staff_client.post(f"/api/v1/policies/{second.version}/activate/")
    assert response.status_code == 200, response.content
    assert response.json()["version"] == second.version and response.json()["is_active"]
    assert staff_client.get("/api/v1/policies/active/").json()["version"] == second.version
    first.refresh_from_db()
    assert not first.is_active
    body = _decide(staff_client, run, graph_doc(health)).json()
    assert body["policy"] == "gnn" and body["policy_version"] == second.version

    # rolling back is the same request
    assert staff_client.post(f"/api/v1/policies/{first.version}/activate/").status_code == 200
    assert _decide(staff_client, run, graph_doc(health)).json()["policy_version"] == 1


def test_activating_is_refused_to_non_staff(api_client):
    version = _version(activate=False)
    response = api_client.post(f"/api/v1/policies/{version.version}/activate/")
    assert response.status_code == 403
    assert _error(response)["code"] == "permission_denied"
    version.refresh_from_db()
    assert not version.is_active


@pytest.mark.parametrize("version", ["99", "99999999999999999999999"])
def test_activating_an_unknown_version_is_a_clear_404(staff_client, version):
    response = staff_client.post(f"/api/v1/policies/{version}/activate/")
    assert response.status_code == 404
    assert "GET /api/v1/policies/" in _error(response)["message"]


def test_a_version_whose_checkpoint_does_not_load_is_never_activated(staff_client):
    from django.core.files.base import ContentFile

    from tamiyo.services import policies

    good, bad = _version(activate=True), _version(activate=False)
    policies._policy_cache.clear()
    bad.checkpoint.save("tampered.safetensors", ContentFile(b"not the trained weights"))
    response = staff_client.post(f"/api/v1/policies/{bad.version}/activate/")
    assert response.status_code == 409
    assert _error(response)["code"] == "checkpoint_corrupt"
    assert PolicyVersion.objects.get(is_active=True).version == good.version


def test_the_admin_activates_one_selected_version(admin_client):
    first, second = _version(activate=True), _version(activate=False)
    url = "/admin/tamiyo/policyversion/"
    page = admin_client.post(
        url, {"action": "activate", "_selected_action": [second.pk]}, follow=True
    )
    assert page.status_code == 200 and "is now active" in page.content.decode()
    assert PolicyVersion.objects.get(is_active=True).pk == second.pk

    page = admin_client.post(
        url, {"action": "activate", "_selected_action": [first.pk, second.pk]}, follow=True
    )
    assert "exactly one" in page.content.decode()
    assert PolicyVersion.objects.get(is_active=True).pk == second.pk


@pytest.mark.parametrize("budget", [-1, 0, "1000", 1.5, True, [5]])
def test_a_run_s_param_budget_must_be_null_or_a_positive_integer(api_client, budget):
    response = api_client.post(
        "/api/v1/runs/", {"name": "r", "config": {"param_budget": budget}}, format="json"
    )
    assert response.status_code == 400, response.content
    assert "config.param_budget" in _error(response)["detail"]
    assert not TrainingRun.objects.exists()
    for fine in (None, 1, 2**62):
        response = api_client.post(
            "/api/v1/runs/", {"name": "r", "config": {"param_budget": fine}}, format="json"
        )
        assert response.status_code == 201, response.content


def _unloadable(version: PolicyVersion, how: str) -> None:
    """Damage `version` so that its checkpoint matches its sha256 but does not load."""
    import hashlib

    from django.core.files.base import ContentFile

    from tamiyo.services import policies

    policies._policy_cache.clear()
    if how == "not safetensors":
        data = b"x" * 64
        version.checkpoint.save("junk.safetensors", ContentFile(data))
        PolicyVersion.objects.filter(pk=version.pk).update(
            checkpoint_sha256=hashlib.sha256(data).hexdigest()
        )
    elif how == "file missing":
        version.checkpoint.storage.delete(version.checkpoint.name)
    else:  # a config that is not an object
        PolicyVersion.objects.filter(pk=version.pk).update(config=[1, 2])


@pytest.mark.parametrize(
    ("how", "code"),
    [
        ("not safetensors", "policy_unusable"),
        ("file missing", "checkpoint_missing"),
        ("config a list", "policy_unusable"),
    ],
)
def test_a_version_that_cannot_load_is_refused_and_decisions_fall_back(
    staff_client, run, health, catalogue, how, code
):
    active, broken = _version(activate=True), _version(activate=False)
    _unloadable(broken, how)
    response = staff_client.post(f"/api/v1/policies/{broken.version}/activate/")
    assert response.status_code == 409 and _error(response)["code"] == code
    assert PolicyVersion.objects.get(is_active=True).pk == active.pk

    _unloadable(active, how)  # the active one damaged in place: decisions still answer
    response = _decide(staff_client, run, graph_doc(health))
    assert response.status_code == 201, response.content
    assert response.json()["policy"] == "heuristic"
