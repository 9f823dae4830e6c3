import pytest
from django.urls import reverse

from urza import services

pytestmark = [pytest.mark.django_db, pytest.mark.fast]


def test_blueprint_changelist_filters_and_searches(admin_client, blueprint):
    url = reverse("admin:urza_blueprint_changelist")
    page = admin_client.get(url, {"source__exact": "user", "q": "residual"})
    assert page.status_code == 200
    assert "test-residual-mlp" in page.content.decode()
    by_tag = admin_client.get(url, {"tags__id__exact": blueprint.tags.first().id})
    assert "test-residual-mlp" in by_tag.content.decode()
    change = admin_client.get(reverse("admin:urza_blueprint_change", args=[blueprint.id]))
    assert change.status_code == 200 and "D/4" in change.content.decode()


def test_kernel_change_page_shows_report_and_download_link(admin_client, blueprint, signature):
    from tezzeret.compiler import compile_kernel
    from tezzeret.ir import parse_signature

    kernel, _ = services.kernel_request(blueprint=blueprint, signature=signature)
    claimed = services.kernel_claim(kernel_id=kernel.id)
    result = compile_kernel(blueprint.ir, parse_signature(signature))
    services.kernel_mark_validated(
        kernel=claimed,
        artifact=result.artifact,
        report=result.report,
        param_count=result.param_count,
        compile_seconds=result.compile_seconds,
    )
    page = admin_client.get(reverse("admin:urza_kernel_change", args=[kernel.id]))
    html = page.content.decode()
    assert "latency_us_p50" in html
    download = reverse("urza-api:kernel-artifact", kwargs={"kernel_id": kernel.id})
    assert download in html
    artifact = admin_client.get(download)
    assert artifact.status_code == 200
    assert b"".join(artifact.streaming_content) == result.artifact
    listing = admin_client.get(
        reverse("admin:urza_kernel_changelist"), {"status__exact": "validated"}
    )
    assert str(kernel.id) in listing.content.decode()
