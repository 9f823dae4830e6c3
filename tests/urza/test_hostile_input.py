"""Bodies that parse as JSON but cannot be stored or echoed, the read-only schema pages,
a missing trailing slash and a forged admin selection: each a clear answer, never a 500."""

import json

import pytest

from tamiyo.models import TrainingRun

pytestmark = pytest.mark.django_db

RUNS = "/api/v1/runs/"


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body["error"]) == {"code", "message", "detail"}
    return body["error"]


def _post_raw(client, url: str, raw: str | bytes):
    return client.generic("POST", url, raw, content_type="application/json")


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ('{"name": "r", "\\ud800": 1}', "lone UTF-16 surrogate"),
        ('{"name": "r", "config": {"k": "\\udfff"}}', "config.k: a string contains a lone"),
        ('{"name": "r\\u0000"}', "name: a string contains a NUL"),
        ('{"name": "r", "model_summary": {"\\u0000": 1}}', "a key contains a NUL"),
        ('{"name": "r", "config": {"n": 1' + "0" * 400 + "}}", "config.n: integer out of range"),
        ('{"name": "r", "config": {"n": -9223372036854775809}}', "integer out of range"),
        ('{"name": "r", "config": ' + "[" * 100 + "]" * 100 + "}", "nested more than 64"),
        ('{"name": "r", "config": {"a": ' + "[" * 64 + "]" * 64 + "}}", "config.a[0][0]"),
        ('{"name": "r", "config": {"n": 9223372036854775808}}', "config.n: integer out of"),
        ("[" * 200_000 + "]" * 200_000, "nested more than 64"),
        ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested more than 64"),
    ],
)
def test_unstorable_json_is_a_400_that_stores_nothing(api_client, raw, says):
    error = _error(_post_raw(api_client, RUNS, raw), 400)
    assert error["code"] == "parse_error" and says in error["message"]
    assert "\ud800" not in error["message"] and "\x00" not in error["message"]
    assert not TrainingRun.objects.exists()
    assert api_client.get(RUNS).status_code == 200


def test_the_deepest_documents_the_api_defines_still_parse(api_client):
    config = {"a": {"b": [{"c": [[1, 2**63 - 1, -(2**63)]]}]}, "s": "ünï ✓ 𝔘"}
    response = _post_raw(api_client, RUNS, json.dumps({"name": "r", "config": config}))
    assert response.status_code == 201, response.content
    assert response.json()["config"] == config


@pytest.mark.parametrize("method", ["options", "post", "put", "patch", "delete"])
@pytest.mark.parametrize("url", ["/api/docs/", "/api/schema/"])
def test_the_schema_pages_are_read_only_and_refuse_in_json(client, url, method):
    error = _error(getattr(client, method)(url), 405)
    assert error["code"] == "method_not_allowed"


def test_the_schema_pages_still_serve_and_a_bad_format_is_a_json_404(client):
    assert client.get("/api/docs/").status_code == 200
    assert client.get("/api/schema/").status_code == 200
    assert client.get("/api/schema/", {"format": "json"}).json()["openapi"].startswith("3.")
    _error(client.get("/api/schema/", {"format": "bogus"}), 404)


@pytest.mark.parametrize("encoding", ["chunked", "gzip, chunked", "Chunked"])
def test_a_chunked_body_is_a_json_411_not_an_empty_body(api_client, encoding):
    response = api_client.generic(
        "POST",
        RUNS,
        json.dumps({"name": "chunky"}),
        content_type="application/json",
        HTTP_TRANSFER_ENCODING=encoding,
    )
    error = _error(response, 411)
    assert error["code"] == "length_required" and "Content-Length" in error["message"]
    assert not TrainingRun.objects.exists()


def test_a_write_without_the_trailing_slash_is_redirected_keeping_method_and_body(api_client):
    response = api_client.post("/api/v1/runs", {"name": "r"}, format="json")
    assert response.status_code == 308 and response["Location"] == RUNS
    assert not TrainingRun.objects.exists()  # nothing done until the client follows it


@pytest.mark.parametrize(
    ("url", "selected"),
    [
        ("/admin/tamiyo/trainingrun/", "zz"),
        ("/admin/tamiyo/policyversion/", "zz"),
        ("/admin/auth/user/", "zz"),
        ("/admin/urza/blueprint/", "not-a-uuid"),
    ],
)
def test_a_forged_admin_selection_is_refused_with_a_message(admin_client, url, selected):
    action = "activate" if "policyversion" in url else "delete_selected"
    page = admin_client.post(url, {"action": action, "_selected_action": [selected]}, follow=True)
    assert page.status_code == 200
    assert "not ids of this model" in page.content.decode()
