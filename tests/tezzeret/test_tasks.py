"""The compile pipeline on a real worker: request over HTTP, compile, download, load, train."""

import hashlib
import io

import pytest
import torch

from tests.support import WorkerProcess, wait_until
from urza import services
from urza.models import Blueprint, Kernel

SIGNATURE = {"graft": "residual", "layout": "features", "in": 48, "out": 48, "dtype": "float32"}


def _kernel_status(kernel_id):
    return Kernel.objects.filter(pk=kernel_id).values_list("status", flat=True).first()


@pytest.mark.fast
def test_kernel_requested_over_api_is_compiled_by_a_worker_downloaded_loaded_and_trained(
    celery_worker, catalogue, api_client
):
    blueprint = Blueprint.objects.get(name="residual-mlp-small", version=1)
    response = api_client.post(
        "/api/v1/kernels/", {"blueprint": blueprint.id, "signature": SIGNATURE}, format="json"
    )
    assert response.status_code == 202, response.content
    kernel_id = response.json()["id"]

    status = wait_until(
        lambda: (s := _kernel_status(kernel_id)) in {"validated", "rejected"} and s,
        what="the worker to finish the compile",
    )
    kernel = api_client.get(f"/api/v1/kernels/{kernel_id}/").json()
    assert status == "validated", kernel["error"]
    assert kernel["attempts"] == 1
    assert kernel["validation"]["output_max_abs_at_init"] == 0.0
    assert len(kernel["validation"]["batch_sizes"]) >= 3

    artifact = api_client.get(kernel["artifact_url"])
    data = b"".join(artifact.streaming_content)
    assert hashlib.sha256(data).hexdigest() == kernel["artifact_sha256"]
    assert artifact["X-Checksum-SHA256"] == kernel["artifact_sha256"]

    program = torch.export.load(io.BytesIO(data))
    seed = program.module()
    params = [p for p in seed.parameters() if p.requires_grad]
    assert params
    optimizer = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(8, 48)
    torch.testing.assert_close(seed(x), torch.zeros(8, 48))
    loss = (seed(x) - x).pow(2).mean()
    loss.backward()
    optimizer.step()
    assert not torch.equal(seed(x), torch.zeros(8, 48))

    again = api_client.post(
        "/api/v1/kernels/", {"blueprint": blueprint.id, "signature": SIGNATURE}, format="json"
    )
    assert again.status_code == 200 and again.json()["id"] == kernel_id


def test_a_kernel_the_compiler_refuses_ends_rejected_once_with_the_reason(celery_worker):
    """A blueprint registered before a validation rule existed: the worker rejects, never retries."""
    legacy_ir = {
        "schema": "esper.blueprint/1",
        "name": "legacy",
        "graft": "residual",
        "layout": "features",
        "params": {},
        "layers": [{"op": "linear", "out": "D", "init": "default", "bias": True}, {"op": "gelu"}],
    }
    blueprint = Blueprint.objects.create(
        name="legacy", version=1, ir=legacy_ir, ir_sha256="f" * 64, source="generated"
    )
    kernel = Kernel.objects.create(
        blueprint=blueprint, signature=SIGNATURE, cache_key="e" * 64, torch_version="2.13.0"
    )
    services._compile_enqueue(str(kernel.id))
    wait_until(lambda: _kernel_status(kernel.id) == "rejected", what="rejection")
    kernel.refresh_from_db()
    assert "zero function" in kernel.error
    assert kernel.attempts == 1 and not kernel.artifact and not kernel.artifact_sha256


@pytest.mark.served
def test_a_worker_killed_mid_compile_is_redelivered_and_validated_exactly_once(
    transactional_db, catalogue, artifact_root, tmp_path
):
    from esper_site.celery import app

    env = {
        "ESPER_VISIBILITY_TIMEOUT": "3",
        "ESPER_UNACKED_RESTORE_INTERVAL": "1",
        "ESPER_UNACKED_RESTORE_THROTTLE": "1",
        # killed at any moment, the first worker may hold the restore lock: let it lapse
        "ESPER_UNACKED_MUTEX_EXPIRE": "2",
    }
    app.control.purge()
    # This test owns the compile queue: other workers of the session stop consuming it.
    app.control.cancel_consumer("compile", reply=True)
    first = WorkerProcess(
        artifact_root=str(artifact_root), queues="compile", log_dir=tmp_path, extra_env=env
    )
    try:
        blueprint = Blueprint.objects.get(name="depthwise-separable", version=1)
        signature = {
            "graft": "residual",
            "layout": "channels",
            "in": 24,
            "out": 24,
            "dtype": "float32",
        }
        kernel, created = services.kernel_request(blueprint=blueprint, signature=signature)
        assert created
        wait_until(
            lambda: _kernel_status(kernel.id) == "compiling",
            interval=0.01,
            what="the first worker to claim the job",
        )
        first.kill()
        assert _kernel_status(kernel.id) == "compiling"

        second = WorkerProcess(
            artifact_root=str(artifact_root), queues="compile", log_dir=tmp_path, extra_env=env
        )
        try:
            wait_until(
                lambda: _kernel_status(kernel.id) == "validated",
                timeout=120,
                what=f"redelivery; worker log:\n{second.log()}",
            )
        finally:
            second.stop()
    finally:
        first.stop()
        for reply in app.control.ping(timeout=1.0):
            for name in reply:
                app.control.add_consumer("compile", destination=[name], reply=True)

    kernel.refresh_from_db()
    assert kernel.attempts == 2
    assert Kernel.objects.filter(cache_key=kernel.cache_key).count() == 1
    stored = kernel.artifact.read()
    assert hashlib.sha256(stored).hexdigest() == kernel.artifact_sha256
    leftovers = [p for p in artifact_root.rglob("*") if p.is_file() and ".partial" in p.name]
    assert leftovers == []


@pytest.mark.skipif(
    "not __import__('django.conf').conf.settings.ESPER_EMBEDDED_BROKER",
    reason="patches the worker thread, which only exists in the embedded default",
)
def test_a_transient_storage_error_is_retried_and_the_kernel_still_validates(
    celery_worker, catalogue, monkeypatch
):
    from urza import storage

    real_save = storage.artifact_save
    calls = []

    def flaky_save(**kwargs):
        calls.append(kwargs["name"])
        if len(calls) == 1:
            raise OSError("storage briefly unavailable")
        return real_save(**kwargs)

    monkeypatch.setattr(services, "artifact_save", flaky_save)
    blueprint = Blueprint.objects.get(name="lowrank-adapter", version=1)
    signature = {"graft": "parallel", "layout": "features", "in": 20, "out": 12, "dtype": "float32"}
    kernel, _ = services.kernel_request(blueprint=blueprint, signature=signature)
    wait_until(lambda: _kernel_status(kernel.id) == "validated", what="the retried compile")
    kernel.refresh_from_db()
    assert len(calls) == 2 and kernel.attempts == 2
    assert kernel.artifact.read()


def test_compile_command_compiles_the_catalogue_for_the_given_sizes(catalogue):
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command(
        "compile",
        "--blueprint",
        "lowrank-adapter",
        "residual-mlp-small",
        "--dims",
        "16",
        "24",
        "--inline",
        stdout=out,
    )
    assert "4 kernels: 4 validated" in out.getvalue()
    assert Kernel.objects.filter(status="validated").count() == 4
    out = StringIO()
    call_command(
        "compile", "--blueprint", "lowrank-adapter", "--dims", "16", "--inline", stdout=out
    )
    assert "1 kernels: 1 validated" in out.getvalue()
    assert Kernel.objects.count() == 4
