"""EsperClient against a live server (pytest-django's `live_server`) and a real worker."""

import hashlib
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kasmina.client import BlueprintInfo, EsperClient, KernelInfo
from kasmina.errors import (
    ApiError,
    ChecksumMismatch,
    KasminaError,
    RegistryUnavailable,
    WaitTimeout,
)

SIGNATURE = {"graft": "residual", "layout": "features", "in": 40, "out": 40, "dtype": "float32"}
CLOSED_PORT = "http://127.0.0.1:1"  # nothing listens on port 1: connections are refused


@pytest.fixture
def client(live_server, token):
    with EsperClient(live_server.url, token.key, timeout=30, retries=1, backoff=0.01) as client:
        yield client


@pytest.fixture
def request_log(client):
    """Every HTTP response this thread's session receives, to count attempts."""
    seen = []
    client.session.hooks["response"].append(lambda r, *a, **k: seen.append(r.status_code))
    return seen


class _Stub(BaseHTTPRequestHandler):
    """Answers each request with the next (status, body) of the server's script."""

    def _answer(self):
        self.server.requests.append((self.command, self.path))
        status, body = self.server.script.pop(0) if self.server.script else (503, None)
        payload = json.dumps(body).encode() if body is not None else b"<h1>unavailable</h1>"
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if body is not None else "text/html")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server():
    """A local HTTP server outside the project that plays a failing proxy or load balancer."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.script, server.requests = [], []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_client_without_url_or_token_says_which_env_var_to_set(monkeypatch):
    monkeypatch.delenv("ESPER_URL", raising=False)
    monkeypatch.delenv("ESPER_TOKEN", raising=False)
    with pytest.raises(ValueError, match="ESPER_URL"):
        EsperClient()
    with pytest.raises(ValueError, match="ESPER_TOKEN"):
        EsperClient("http://127.0.0.1:8000")


def test_client_reads_url_and_token_from_the_environment(monkeypatch, live_server, token):
    monkeypatch.setenv("ESPER_URL", live_server.url + "/api/v1/")
    monkeypatch.setenv("ESPER_TOKEN", token.key)
    client = EsperClient()
    assert client.base_url == live_server.url
    assert client.session.headers["Authorization"] == f"Token {token.key}"
    assert client.session.headers["User-Agent"].startswith("kasmina/")
    assert client.list_blueprints(name="no-such-blueprint") == []


def test_healthz_returns_the_servers_report(client, celery_worker):
    report = client.healthz()
    assert report["ok"] is True
    assert {"database", "broker", "workers"} <= set(report["checks"])


def test_list_blueprints_follows_every_page_and_returns_typed_results(client, catalogue):
    everything = client.list_blueprints(page_size=500)
    paged = client.list_blueprints(page_size=3)
    assert len(everything) >= 8
    assert [b.id for b in paged] == [b.id for b in everything]
    assert all(isinstance(b, BlueprintInfo) for b in paged)
    small = client.list_blueprints(name="residual-mlp-small")
    assert len(small) == 1
    blueprint = small[0]
    assert blueprint.version == 1 and blueprint.source == "catalogue"
    assert blueprint.status == "active" and "features" in blueprint.tags
    assert blueprint.ir["schema"] == "esper.blueprint/1" and len(blueprint.ir_sha256) == 64
    features = client.list_blueprints(tag="features", source="catalogue")
    assert blueprint.id in {b.id for b in features}
    assert all("features" in b.tags for b in features)


def test_unknown_blueprint_filters_are_refused_before_any_request(client):
    with pytest.raises(TypeError, match="tags"):
        client.list_blueprints(tags="features")


def test_create_and_get_blueprint_return_the_stored_blueprint(client, catalogue):
    ir = client.list_blueprints(name="residual-mlp-small")[0].ir | {"name": "my-mlp"}
    created = client.create_blueprint("my-mlp", 1, ir, description="mine", tags=("custom",))
    assert created.source == "user" and created.tags == ("custom",)
    assert created.description == "mine"
    assert client.get_blueprint(created.id) == created


def test_4xx_raises_api_error_with_the_servers_code_and_is_not_retried(client, request_log):
    missing = str(uuid.uuid4())
    with pytest.raises(ApiError) as caught:
        client.get_blueprint(missing)
    assert (caught.value.status, caught.value.code) == (404, "not_found")
    assert missing in caught.value.message
    assert request_log == [404]

    with pytest.raises(ApiError) as caught:
        client.create_blueprint("bad-ir", 1, {"schema": "esper.blueprint/1"})
    assert (caught.value.status, caught.value.code) == (400, "invalid")
    assert caught.value.detail == {"ir.name": ["required"]}
    assert request_log == [404, 400]
    assert isinstance(caught.value, KasminaError)


def test_a_wrong_token_is_an_api_error_401(live_server):
    client = EsperClient(live_server.url, "not-a-token", retries=2, backoff=0.01)
    with pytest.raises(ApiError) as caught:
        client.get_kernel(str(uuid.uuid4()))
    assert caught.value.status == 401 and caught.value.code == "authentication_failed"


def test_unreachable_registry_raises_registry_unavailable_after_the_retries_quickly():
    client = EsperClient(CLOSED_PORT, "token", timeout=0.5, retries=2, backoff=0.01)
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable) as caught:
        client.get_kernel(str(uuid.uuid4()))
    assert caught.value.attempts == 3
    assert "refused" in caught.value.reason.lower()
    assert time.monotonic() - started < 2.0


def test_a_503_is_retried_and_the_following_200_is_returned(flaky_server):
    flaky_server.script = [(503, None), (502, {"error": {"code": "bad_gateway"}}), (200, {"ok": 1})]
    client = EsperClient(
        f"http://127.0.0.1:{flaky_server.server_port}", "token", retries=3, backoff=0.01
    )
    assert client.request("GET", "runs/1/") == {"ok": 1}
    assert flaky_server.requests == [("GET", "/api/v1/runs/1/")] * 3


def test_5xx_on_every_attempt_raises_registry_unavailable_naming_the_status(flaky_server):
    client = EsperClient(
        f"http://127.0.0.1:{flaky_server.server_port}", "token", retries=2, backoff=0.01
    )
    with pytest.raises(RegistryUnavailable) as caught:
        client.get_kernel("k")
    assert caught.value.status == 503 and caught.value.attempts == 3
    assert len(flaky_server.requests) == 3


def test_a_post_that_reached_the_server_is_not_retried_unless_idempotent(flaky_server):
    client = EsperClient(
        f"http://127.0.0.1:{flaky_server.server_port}", "token", retries=3, backoff=0.01
    )
    with pytest.raises(RegistryUnavailable) as caught:
        client.request("POST", "runs/", {"name": "r"})
    assert caught.value.attempts == 1 and len(flaky_server.requests) == 1

    flaky_server.script = [(503, None), (202, {"id": "k"})]
    assert client.request("POST", "kernels/", {}, idempotent=True) == {"id": "k"}
    assert len(flaky_server.requests) == 3


def test_a_non_json_answer_is_an_esper_error_that_names_the_url(flaky_server):
    flaky_server.script = [(404, None)]
    client = EsperClient(f"http://127.0.0.1:{flaky_server.server_port}", "token", retries=0)
    with pytest.raises(ApiError) as caught:
        client.get_kernel("k")
    assert caught.value.code == "http_404" and "unavailable" in caught.value.message


def test_a_pending_kernel_has_no_artifact_and_waiting_for_it_times_out(client, catalogue):
    from urza import services
    from urza.models import Blueprint

    blueprint = Blueprint.objects.get(name="residual-mlp-small", version=1)
    kernel, _ = services.kernel_request(blueprint=blueprint, signature=SIGNATURE, enqueue=False)
    info = client.get_kernel(str(kernel.id))
    assert (info.status, info.is_ready, info.is_final) == ("pending", False, False)
    with pytest.raises(ApiError) as caught:
        client.download_artifact(info.id)
    assert (caught.value.status, caught.value.code) == (409, "not_validated")
    with pytest.raises(WaitTimeout, match="still pending"):
        client.wait_for_kernel(info.id, timeout=0.3, poll=0.05)


def test_a_requested_kernel_compiles_and_downloads_with_a_verified_checksum(
    client, celery_worker, catalogue
):
    blueprint = client.list_blueprints(name="residual-mlp-small")[0]
    requested = client.request_kernel(blueprint.id, SIGNATURE)
    assert isinstance(requested, KernelInfo)
    assert requested.blueprint == blueprint.id and requested.signature == SIGNATURE
    assert requested.status in {"pending", "compiling", "validated"}

    kernel = client.wait_for_kernel(requested.id, timeout=120)
    assert kernel.is_ready and kernel.is_final, kernel.error
    assert kernel.attempts == 1 and kernel.param_count > 0
    assert kernel.validation["output_max_abs_at_init"] == 0.0
    assert client.request_kernel(blueprint.id, SIGNATURE).id == kernel.id  # get-or-create

    data = client.download_artifact(kernel.id, expected_sha256=kernel.artifact_sha256)
    assert hashlib.sha256(data).hexdigest() == kernel.artifact_sha256
    assert len(data) == kernel.size_bytes

    with pytest.raises(ChecksumMismatch) as caught:
        client.download_artifact(kernel.id, expected_sha256="0" * 64)
    assert caught.value.actual == kernel.artifact_sha256
