"""KernelLoader: fetch → verify → deserialise from a live server, caches, breaker, background."""

import gc
import hashlib
import json
import threading
import time
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from kasmina.cache import CacheEntry, KernelCache
from kasmina.client import EsperClient, KernelInfo
from kasmina.errors import (
    ApiError,
    ChecksumMismatch,
    CircuitOpen,
    KasminaError,
    KernelLoadFailed,
    KernelNotCached,
    KernelNotReady,
    KernelRejected,
    RegistryUnavailable,
)
from kasmina.loader import KernelLoader, LoadedKernel

FEATURES = {"graft": "residual", "layout": "features", "in": 32, "out": 32, "dtype": "float32"}
CLOSED_PORT = "http://127.0.0.1:1"  # nothing listens on port 1: connections are refused

_COMPILED: dict[str, dict] = {}


def validated_kernel(client: EsperClient, blueprint_name: str = "residual-mlp-small") -> KernelInfo:
    """A validated kernel on the live server; the real worker compiles it once per module.

    Transactional tests flush the database after each test, so later tests register the
    worker's artifact again through the services the worker itself uses (claim, validate).
    """
    from urza import services
    from urza.models import Blueprint

    blueprint = client.list_blueprints(name=blueprint_name)[0]
    key = json.dumps([blueprint.ir_sha256, FEATURES], sort_keys=True)
    compiled = _COMPILED.get(key)
    if compiled is None:
        requested = client.request_kernel(blueprint.id, FEATURES)
        info = client.wait_for_kernel(requested.id, timeout=120)
        assert info.is_ready, info.error
        _COMPILED[key] = {
            "artifact": client.download_artifact(info.id, expected_sha256=info.artifact_sha256),
            "report": info.validation,
            "param_count": info.param_count,
        }
        return info
    kernel, created = services.kernel_request(
        blueprint=Blueprint.objects.get(pk=blueprint.id), signature=FEATURES, enqueue=False
    )
    if created:
        claimed = services.kernel_claim(kernel_id=str(kernel.id))
        services.kernel_mark_validated(
            kernel=claimed,
            artifact=compiled["artifact"],
            report=compiled["report"],
            param_count=compiled["param_count"],
            compile_seconds=0.0,
        )
    return client.get_kernel(str(kernel.id))


@pytest.fixture
def client(live_server, token):
    with EsperClient(live_server.url, token.key, timeout=30, retries=1, backoff=0.01) as client:
        yield client


@pytest.fixture
def kernel(client, celery_worker, catalogue) -> KernelInfo:
    return validated_kernel(client)


@pytest.fixture
def down_client():
    return EsperClient(CLOSED_PORT, "token", timeout=0.5, retries=0)


@pytest.fixture
def loaders():
    """Make loaders that are closed after the test."""
    made = []

    def make(*args, **kwargs) -> KernelLoader:
        made.append(KernelLoader(*args, **kwargs))
        return made[-1]

    yield make
    for loader in made:
        loader.close()


class _Always503(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.hits += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_proxy():
    """A local server outside the project that answers 503 to everything, counting requests."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Always503)
    server.hits = 0
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_fetch_downloads_verifies_and_loads_a_trainable_kernel(client, kernel, loaders):
    loader = loaders(client, KernelCache())
    loaded = loader.fetch(kernel.id)
    assert isinstance(loaded, LoadedKernel)
    assert (loaded.kernel_id, loaded.sha256) == (kernel.id, kernel.artifact_sha256)
    assert loaded.signature == FEATURES and loaded.param_count == kernel.param_count

    module = loaded.module
    assert module.training
    x = torch.randn(6, 32)
    torch.testing.assert_close(module(x), torch.zeros(6, 32))  # residual seeds start at zero
    params = list(module.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    (module(x) - x).pow(2).mean().backward()
    assert all(p.grad is not None for p in params)
    optimizer.step()
    assert module(x).abs().sum() > 0
    assert loader.cache.stats() | {"bytes": 0} == {
        "hits": 0,
        "misses": 1,
        "evictions": 0,
        "bytes": 0,
        "entries": 1,
        "disk_hits": 0,
        "disk_corrupt": 0,
    }


def test_two_fetches_of_one_kernel_give_independent_modules_with_identical_outputs(
    client, kernel, loaders
):
    loader = loaders(client)
    first, second = loader.fetch(kernel.id), loader.fetch(kernel.id)
    assert loader.cache.stats()["hits"] == 1
    a, b = first.module, second.module
    assert a is not b
    assert not {p.data_ptr() for p in a.parameters()} & {p.data_ptr() for p in b.parameters()}
    x = torch.randn(5, 32)
    torch.testing.assert_close(a(x), b(x))

    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p))
    assert not torch.equal(a(x), b(x))
    third = loader.fetch(kernel.id).module  # the cached template was not touched
    torch.testing.assert_close(third(x), b(x))
    third.load_state_dict(a.state_dict())
    torch.testing.assert_close(third(x), a(x))


def test_fetched_copies_keep_the_input_guard_and_switch_train_and_eval(client, kernel, loaders):
    loader = loaders(client)
    loader.fetch(kernel.id)
    module = loader.fetch(kernel.id).module  # a copy of the cached template
    with pytest.raises(RuntimeError, match=r"kernel expects one tensor of shape \[\*, 32\]"):
        module(torch.randn(4, 7))
    module.eval()
    assert not module.training and not any(m.training for m in module.modules())
    module.train()
    assert all(m.training for m in module.modules())
    assert module(torch.randn(1, 32)).shape == (1, 32)
    assert module(torch.randn(64, 32)).shape == (64, 32)


def test_submit_loads_on_a_background_thread_and_shares_the_in_flight_future(
    client, kernel, loaders
):
    loader = loaders(client)
    first = loader.submit(kernel.id)
    second = loader.submit(kernel.id)
    assert second is first or first.done()
    loaded = first.result(timeout=60)
    assert loaded.kernel_id == kernel.id and loaded.param_count == kernel.param_count
    again = loader.submit(kernel.id).result(timeout=60)
    assert again.module is not loaded.module

    missing = loader.submit("00000000-0000-0000-0000-000000000000")
    assert isinstance(missing.exception(timeout=60), ApiError)
    loader.close()
    with pytest.raises(KasminaError, match="closed"):
        loader.submit(kernel.id)


def test_a_loader_dropped_without_close_lets_its_thread_and_client_go(client, kernel):
    """A wrapped model thrown away unclosed must not leave a thread (and, through it, the
    client's pooled HTTP connections) behind."""
    loader = KernelLoader(client)
    loader.submit(kernel.id).result(timeout=60)
    thread, loader_ref = loader._thread, weakref.ref(loader)
    assert thread.is_alive()
    del loader
    gc.collect()
    thread.join(timeout=10)
    assert loader_ref() is None and not thread.is_alive()


def test_disk_cache_lets_a_new_process_load_with_the_registry_down(
    client, kernel, loaders, down_client, tmp_path
):
    loaders(client, KernelCache(disk_dir=tmp_path)).fetch(kernel.id)
    assert (tmp_path / f"{kernel.artifact_sha256}.pt2").is_file()

    cache = KernelCache(disk_dir=tmp_path)  # a restarted process
    loaded = loaders(down_client, cache).fetch(kernel.id)
    assert loaded.sha256 == kernel.artifact_sha256 and loaded.signature == FEATURES
    assert cache.stats()["disk_hits"] == 1

    offline = loaders(None, KernelCache(disk_dir=tmp_path))
    assert offline.fetch(kernel.id).param_count == kernel.param_count


def test_tampered_disk_file_is_deleted_and_the_kernel_downloaded_again(
    client, kernel, loaders, tmp_path
):
    loaders(client, KernelCache(disk_dir=tmp_path)).fetch(kernel.id)
    path = tmp_path / f"{kernel.artifact_sha256}.pt2"
    path.write_bytes(path.read_bytes()[:-10] + b"x" * 10)

    cache = KernelCache(disk_dir=tmp_path)
    loaded = loaders(client, cache).fetch(kernel.id)
    assert loaded.sha256 == kernel.artifact_sha256
    assert cache.stats()["disk_corrupt"] == 1 and cache.stats()["disk_hits"] == 0
    assert hashlib.sha256(path.read_bytes()).hexdigest() == kernel.artifact_sha256


def test_tampered_disk_file_with_the_registry_down_is_refused_and_deleted(
    client, kernel, loaders, down_client, tmp_path
):
    loaders(client, KernelCache(disk_dir=tmp_path)).fetch(kernel.id)
    path = tmp_path / f"{kernel.artifact_sha256}.pt2"
    path.write_bytes(b"\0" * path.stat().st_size)

    loader = loaders(down_client, KernelCache(disk_dir=tmp_path))
    with pytest.raises(RegistryUnavailable):
        loader.fetch(kernel.id)
    assert not path.exists()
    assert loader.failures(kernel.id) == 1


def test_bytes_that_differ_from_the_registrys_sha256_are_refused_before_deserialising(
    client, kernel, loaders, tmp_path
):
    from urza.models import Kernel

    # The registry now publishes a different checksum than its stored (loadable) bytes have.
    Kernel.objects.filter(pk=kernel.id).update(artifact_sha256="0" * 64)
    cache = KernelCache(disk_dir=tmp_path)
    loader = loaders(client, cache)
    with pytest.raises(ChecksumMismatch) as caught:
        loader.fetch(kernel.id)
    assert caught.value.actual == kernel.artifact_sha256
    assert "refused before deserialising" in str(caught.value)
    assert cache.stats()["entries"] == 0 and list(tmp_path.glob("*.pt2")) == []
    assert loader.failures(kernel.id) == 1


def test_a_cached_artifact_that_fails_its_checksum_is_refused_then_downloaded_afresh(
    client, kernel, loaders
):
    cache = KernelCache()
    # Bytes that would fail to deserialise: refusing them with ChecksumMismatch (not
    # KernelLoadFailed) shows the checksum is checked first.
    cache.put(CacheEntry(kernel.id, kernel.artifact_sha256, FEATURES, b"not a kernel"))
    loader = loaders(client, cache)
    with pytest.raises(ChecksumMismatch):
        loader.fetch(kernel.id)
    assert kernel.id not in cache
    assert loader.fetch(kernel.id).sha256 == kernel.artifact_sha256
    assert loader.failures(kernel.id) == 0


def test_verified_bytes_that_are_not_a_kernel_raise_kernel_load_failed():
    junk = b"PK\x05\x06" + b"\0" * 18  # an empty zip archive
    cache = KernelCache()
    cache.put(CacheEntry("k", hashlib.sha256(junk).hexdigest(), {}, junk))
    with pytest.raises(KernelLoadFailed, match="could not be loaded"):
        KernelLoader(None, cache).fetch("k")


def test_an_offline_loader_with_nothing_cached_says_to_pass_a_client():
    with pytest.raises(KernelNotCached, match="pass an EsperClient"):
        KernelLoader(None, KernelCache()).fetch("k")
    with pytest.raises(ValueError, match="needs a client, a cache, or both"):
        KernelLoader(None, None)


def test_breaker_opens_after_max_failures_and_then_fails_fast_without_network(
    failing_proxy, loaders
):
    proxy = EsperClient(f"http://127.0.0.1:{failing_proxy.server_port}", "t", retries=0)
    loader = loaders(proxy, max_failures=3, backoff_s=10, max_backoff_s=25)
    delays = []
    for expected in (1, 2, 3):
        with pytest.raises(RegistryUnavailable):
            loader.fetch("k")
        assert loader.failures("k") == expected
        delays.append(loader.next_retry_at("k") - time.monotonic())
    assert [round(d) for d in delays] == [10, 20, 25]  # exponential, capped
    assert failing_proxy.hits == 3 and loader.is_open("k")

    with pytest.raises(CircuitOpen, match="3 consecutive failures") as caught:
        loader.fetch("k")
    assert "RegistryUnavailable" in caught.value.last_error
    assert isinstance(loader.submit("k").exception(timeout=5), CircuitOpen)
    assert failing_proxy.hits == 3
    assert loader.failures("other") == 0 and loader.next_retry_at("other") == 0.0


def test_breaker_lets_one_attempt_through_after_the_backoff_and_a_success_resets_it(
    client, kernel, loaders, down_client
):
    loader = loaders(down_client, max_failures=2, backoff_s=0.05)
    for _ in range(2):
        with pytest.raises(RegistryUnavailable):
            loader.fetch(kernel.id)
    with pytest.raises(CircuitOpen):
        loader.fetch(kernel.id)
    while time.monotonic() < loader.next_retry_at(kernel.id):
        time.sleep(0.01)
    loader.client = client  # the registry is back
    assert loader.fetch(kernel.id).kernel_id == kernel.id
    assert loader.failures(kernel.id) == 0 and loader.next_retry_at(kernel.id) == 0.0


def test_a_rejected_kernel_raises_kernel_rejected_and_opens_the_breaker_at_once(
    client, catalogue, loaders
):
    from urza import services
    from urza.models import Blueprint

    blueprint = Blueprint.objects.get(name="residual-mlp-wide", version=1)
    pending, _ = services.kernel_request(blueprint=blueprint, signature=FEATURES, enqueue=False)
    services.kernel_mark_rejected(
        kernel=services.kernel_claim(kernel_id=str(pending.id)), error="grad check failed"
    )
    loader = loaders(client, max_failures=3)
    with pytest.raises(KernelRejected, match="grad check failed"):
        loader.fetch(str(pending.id))
    with pytest.raises(CircuitOpen, match="grad check failed"):
        loader.fetch(str(pending.id))


def test_a_kernel_still_compiling_raises_kernel_not_ready_and_counts_no_failure(
    client, catalogue, loaders
):
    from urza import services
    from urza.models import Blueprint

    blueprint = Blueprint.objects.get(name="residual-mlp-wide", version=1)
    pending, _ = services.kernel_request(blueprint=blueprint, signature=FEATURES, enqueue=False)
    loader = loaders(client, max_failures=1)
    for _ in range(3):
        with pytest.raises(KernelNotReady, match="pending") as caught:
            loader.fetch(str(pending.id))
    assert caught.value.status == "pending"
    assert loader.failures(str(pending.id)) == 0
