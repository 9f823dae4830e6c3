import hashlib

import pytest
from django.urls import reverse

from urza import services
from urza.models import Kernel

pytestmark = [pytest.mark.django_db, pytest.mark.fast]

URL = "/api/v1/kernels/"


def _error(response):
    body = response.json()
    assert set(body["error"]) == {"code", "message", "detail"}
    return body["error"]


def test_blueprint_over_http_then_kernel_twice_is_one_kernel_visible_in_admin(
    api_client, admin_client, ir, signature
):
    created = api_client.post(
        "/api/v1/blueprints/", {"name": "http-mlp", "version": 1, "ir": ir}, format="json"
    )
    assert created.status_code == 201, created.content
    blueprint_id = created.json()["id"]

    first = api_client.post(URL, {"blueprint": blueprint_id, "signature": signature}, format="json")
    assert first.status_code == 202, first.content
    assert first.json()["status"] == "pending"
    second = api_client.post(
        URL,
        {"blueprint": blueprint_id, "signature": dict(reversed(signature.items()))},
        format="json",
    )
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["cache_key"] == first.json()["cache_key"]
    assert Kernel.objects.filter(blueprint_id=blueprint_id).count() == 1

    changelist = admin_client.get(reverse("admin:urza_kernel_changelist"), {"q": "http-mlp"})
    assert changelist.status_code == 200
    assert first.json()["id"] in changelist.content.decode()
    change = admin_client.get(reverse("admin:urza_kernel_change", args=[first.json()["id"]]))
    assert change.status_code == 200


def test_a_different_signature_is_a_different_kernel(api_client, blueprint, signature):
    a = api_client.post(URL, {"blueprint": blueprint.id, "signature": signature}, format="json")
    signature["in"] = signature["out"] = 64
    b = api_client.post(URL, {"blueprint": blueprint.id, "signature": signature}, format="json")
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


def test_kernel_for_a_retired_blueprint_gets_409_and_writes_nothing(
    api_client, blueprint, signature
):
    services.blueprint_retire(blueprint=blueprint)
    response = api_client.post(
        URL, {"blueprint": blueprint.id, "signature": signature}, format="json"
    )
    assert response.status_code == 409
    assert _error(response)["code"] == "blueprint_retired"
    assert not Kernel.objects.exists()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"layout": "channels"}, "signature.layout"),
        ({"graft": "parallel"}, "signature.graft"),
        ({"in": -3}, "signature.in"),
        ({"dtype": "int8"}, "signature.dtype"),
        ({"colour": "red"}, "signature.colour"),
    ],
)
def test_a_signature_that_does_not_fit_gets_400_naming_the_field(
    api_client, blueprint, signature, change, field
):
    signature.update(change)
    response = api_client.post(
        URL, {"blueprint": blueprint.id, "signature": signature}, format="json"
    )
    assert response.status_code == 400, response.content
    error = _error(response)
    assert field in error["detail"], error
    assert not Kernel.objects.exists()


def test_kernel_request_for_unknown_blueprint_gets_400(api_client, signature):
    response = api_client.post(
        URL,
        {"blueprint": "00000000-0000-0000-0000-000000000000", "signature": signature},
        format="json",
    )
    assert response.status_code == 400
    assert "blueprint" in _error(response)["detail"]


def test_artifact_of_a_kernel_that_is_not_validated_gets_409(api_client, blueprint, signature):
    kernel, _ = services.kernel_request(blueprint=blueprint, signature=signature)
    response = api_client.get(f"{URL}{kernel.id}/artifact/")
    assert response.status_code == 409
    assert _error(response)["detail"] == {"status": "pending"}


def test_validated_artifact_is_served_with_etag_and_checksum(api_client, blueprint, signature):
    from tezzeret.compiler import compile_kernel
    from tezzeret.ir import parse_signature

    kernel, _ = services.kernel_request(blueprint=blueprint, signature=signature)
    claimed = services.kernel_claim(kernel_id=kernel.id)
    result = compile_kernel(blueprint.ir, parse_signature(signature))
    assert services.kernel_mark_validated(
        kernel=claimed,
        artifact=result.artifact,
        report=result.report,
        param_count=result.param_count,
        compile_seconds=result.compile_seconds,
    )
    detail = api_client.get(f"{URL}{kernel.id}/").json()
    assert detail["status"] == "validated"
    assert detail["artifact_url"].endswith(f"/api/v1/kernels/{kernel.id}/artifact/")
    assert detail["validation"]["grad_check"] == "ok"

    response = api_client.get(f"{URL}{kernel.id}/artifact/")
    assert response.status_code == 200
    body = b"".join(response.streaming_content)
    digest = hashlib.sha256(body).hexdigest()
    assert response["X-Checksum-SHA256"] == digest == detail["artifact_sha256"]
    assert response["ETag"] == f'"{digest}"'
    assert body == result.artifact

    cached = api_client.get(f"{URL}{kernel.id}/artifact/", HTTP_IF_NONE_MATCH=f'"{digest}"')
    assert cached.status_code == 304


def test_kernel_list_filters_by_status(api_client, blueprint, signature):
    kernel, _ = services.kernel_request(blueprint=blueprint, signature=signature)
    pending = api_client.get(URL, {"status": "pending"}).json()
    assert [k["id"] for k in pending["results"]] == [str(kernel.id)]
    assert api_client.get(URL, {"status": "validated"}).json()["count"] == 0


def test_cache_key_is_unique_in_the_database(blueprint, signature):
    from django.db import IntegrityError, transaction

    kernel, _ = services.kernel_request(blueprint=blueprint, signature=signature)
    with pytest.raises(IntegrityError), transaction.atomic():
        Kernel.objects.create(blueprint=blueprint, signature=signature, cache_key=kernel.cache_key)


def test_cache_key_covers_ir_signature_compiler_and_torch(blueprint, signature, settings):
    base = services.kernel_cache_key(ir_sha256=blueprint.ir_sha256, signature=signature)
    assert base != services.kernel_cache_key(ir_sha256="0" * 64, signature=signature)
    assert base != services.kernel_cache_key(
        ir_sha256=blueprint.ir_sha256, signature={**signature, "in": 7}
    )
    settings.ESPER_COMPILER_VERSION = "tezzeret-next"
    assert base != services.kernel_cache_key(ir_sha256=blueprint.ir_sha256, signature=signature)
