import pytest

from urza.models import Blueprint

pytestmark = [pytest.mark.django_db, pytest.mark.fast]

URL = "/api/v1/blueprints/"


def _error(response):
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "detail"}
    return body["error"]


def test_submitted_blueprint_is_created_with_its_sha_and_tags(api_client, ir, user):
    response = api_client.post(
        URL, {"name": "my-mlp", "version": 1, "ir": ir, "tags": ["mlp"]}, format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["name"] == "my-mlp" and body["version"] == 1
    assert body["source"] == "user" and body["status"] == "active"
    assert body["tags"] == ["mlp"] and body["created_by"] == user.username
    assert len(body["ir_sha256"]) == 64
    detail = api_client.get(f"{URL}{body['id']}/")
    assert detail.status_code == 200 and detail.json()["ir"] == body["ir"]


def test_list_filters_by_tag_source_and_status(api_client, catalogue, blueprint):
    catalogue = Blueprint.objects.filter(source="catalogue").count()
    assert catalogue >= 8
    by_tag = api_client.get(URL, {"tag": "test"}).json()
    assert [b["id"] for b in by_tag["results"]] == [str(blueprint.id)]
    by_source = api_client.get(URL, {"source": "catalogue", "limit": 100}).json()
    assert by_source["count"] == catalogue
    assert api_client.get(URL, {"status": "retired"}).json()["count"] == 0
    bad = api_client.get(URL, {"source": "nonsense"})
    assert bad.status_code == 400 and "source" in _error(bad)["message"]


def test_invalid_ir_gets_400_naming_the_field_and_writes_nothing(api_client, ir):
    ir["layers"][1]["op"] = "teleport"
    before = Blueprint.objects.count()
    response = api_client.post(URL, {"name": "bad", "version": 1, "ir": ir}, format="json")
    assert response.status_code == 400
    error = _error(response)
    assert error["message"].startswith("ir.layers[1].op")
    assert "ir.layers[1].op" in error["detail"]
    assert Blueprint.objects.count() == before


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"name": "x", "version": 1, "ir": {}, "colour": "red"}, "colour"),
        ({"name": "not a slug", "version": 1}, "name"),
        ({"name": "x", "version": 0}, "version"),
        ({"name": "x", "version": 1, "ir": [1, 2]}, "ir"),
        ({"name": "x", "version": 1, "ir": "{}"}, "ir"),
    ],
)
def test_malformed_submission_gets_400_naming_the_field(api_client, payload, field):
    before = Blueprint.objects.count()
    response = api_client.post(URL, payload, format="json")
    assert response.status_code == 400
    assert field in _error(response)["detail"]
    assert Blueprint.objects.count() == before


def test_an_existing_version_is_immutable_and_gets_409(api_client, blueprint, ir):
    ir["params"]["r"] = "D/2"
    response = api_client.post(URL, {"name": blueprint.name, "version": 1, "ir": ir}, format="json")
    assert response.status_code == 409
    assert "version 2" in _error(response)["message"]


def test_identical_ir_under_another_name_gets_409(api_client, blueprint, ir):
    response = api_client.post(URL, {"name": "copycat", "version": 1, "ir": ir}, format="json")
    assert response.status_code == 409
    assert _error(response)["detail"]["existing"] == str(blueprint.id)


@pytest.mark.parametrize("header", [None, "Token nope", "Bearer abc", "Token"])
def test_missing_or_wrong_token_gets_401_for_reads_and_writes(anon_client, header, ir):
    if header:
        anon_client.credentials(HTTP_AUTHORIZATION=header)
    assert anon_client.get(URL).status_code == 401
    response = anon_client.post(URL, {"name": "x", "version": 1, "ir": ir}, format="json")
    assert response.status_code == 401
    assert _error(response)["code"] in {"not_authenticated", "authentication_failed"}
    assert not Blueprint.objects.filter(name="x").exists()


def test_a_parent_that_does_not_exist_is_a_400_naming_the_field(api_client, ir, blueprint):
    missing = "00000000-0000-0000-0000-000000000000"
    response = api_client.post(
        URL, {"name": "child", "version": 1, "ir": ir, "parent": missing}, format="json"
    )
    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "invalid" and missing in error["detail"]["parent"][0]
    assert not Blueprint.objects.filter(name="child").exists()
    child = {"name": "child", "version": 1, "ir": {**ir, "name": "child"}, "parent": blueprint.id}
    response = api_client.post(URL, child, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["parent"] == str(blueprint.id)


def test_non_uuid_id_gets_a_json_404(api_client):
    response = api_client.get(f"{URL}not-a-uuid/")
    assert response.status_code == 404
    assert _error(response)["code"] == "not_found"


def test_unknown_uuid_gets_a_json_404(api_client):
    response = api_client.get(f"{URL}00000000-0000-0000-0000-000000000000/")
    assert response.status_code == 404
    assert _error(response)["code"] == "not_found"


def test_oversize_payload_gets_413_and_writes_nothing(api_client, ir, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    payload = {"name": "big", "version": 1, "ir": ir, "description": "x" * 5000}
    response = api_client.post(URL, payload, format="json")
    assert response.status_code == 413
    assert _error(response)["code"] == "payload_too_large"
    assert not Blueprint.objects.filter(name="big").exists()


def test_broken_json_gets_400_and_other_media_types_415(api_client):
    broken = api_client.post(URL, data="{not json", content_type="application/json")
    assert broken.status_code == 400 and _error(broken)["code"] == "parse_error"
    form = api_client.post(URL, data="name=x", content_type="application/x-www-form-urlencoded")
    assert form.status_code == 415 and _error(form)["code"] == "unsupported_media_type"


def test_blueprint_rows_cannot_be_edited_in_place(blueprint):
    blueprint.ir = {**blueprint.ir, "params": {"r": "D/2"}}
    with pytest.raises(ValueError, match="immutable"):
        blueprint.save()
    blueprint.refresh_from_db()
    blueprint.description = "descriptions may change"
    blueprint.save()


def test_an_offset_past_what_the_database_addresses_is_a_400(api_client):
    response = api_client.get(URL, {"offset": 2**63})
    assert response.status_code == 400
    assert "offset" in _error(response)["detail"]
    assert api_client.get(URL, {"limit": 10**9}).status_code == 200


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"params": {"r": "D / 0"}, "out": "r"}, "params.r", "division by zero"),
        ({"out": 0}, "layers[0].out", "must be positive"),
        ({"out": 100_000}, "layers[0].out", "exceeds MAX_DIM"),
    ],
)
def test_an_ir_that_fits_no_host_is_refused_at_registration(api_client, ir, change, field, says):
    bad = {**ir, "params": change.get("params", ir.get("params", {}))}
    bad["layers"] = [{**ir["layers"][0], "out": change["out"]}, *ir["layers"][1:]]
    response = api_client.post(URL, {"name": "never-fits", "version": 1, "ir": bad}, format="json")
    assert response.status_code == 400, response.content
    error = _error(response)
    assert field in error["message"] and says in error["message"]
    assert "fits no host" in error["message"]
    assert not Blueprint.objects.filter(name="never-fits").exists()


def test_a_seed_without_parameters_is_refused_at_registration(api_client, ir):
    bad = {**ir, "graft": "parallel", "layers": [{"op": "relu"}]}
    response = api_client.post(URL, {"name": "no-params", "version": 1, "ir": bad}, format="json")
    assert response.status_code == 400, response.content
    assert "no trainable parameters" in _error(response)["message"]


def test_an_ir_that_fits_only_some_hosts_is_accepted(api_client, ir):
    # IN - OUT is positive only for a host that narrows: it fits (64 -> 10), not (64 -> 64)
    narrowing = {
        **ir,
        "graft": "parallel",
        "params": {"r": "IN - OUT"},
        "layers": [{"op": "linear", "out": "r"}, {"op": "linear", "out": "OUT", "init": "zeros"}],
    }
    response = api_client.post(
        URL, {"name": "narrowing", "version": 1, "ir": narrowing}, format="json"
    )
    assert response.status_code == 201, response.content
