import pytest
import torch

from kasmina.client import EsperClient
from tests.kasmina._loop import Loop


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def registry(live_server, token, celery_worker, catalogue):
    """A client of a real server (live_server) whose kernels a real worker compiles."""
    return EsperClient(live_server.url, token.key, timeout=10)


@pytest.fixture
def compiled(registry):
    """compiled(blueprint_name, graft, layout, in, out) -> kernel id, validated."""

    def make(name: str, graft: str, layout: str, n_in: int, n_out: int) -> str:
        blueprint = registry.list_blueprints(name=name)[0]
        signature = {"graft": graft, "layout": layout, "in": n_in, "out": n_out, "dtype": "float32"}
        kernel = registry.request_kernel(blueprint.id, signature)
        kernel = registry.wait_for_kernel(kernel.id, timeout=120)
        assert kernel.status == "validated", kernel.error
        return kernel.id

    return make


@pytest.fixture
def client(registry, token):
    """A client of the live server (real worker) that gives up quickly when it is down."""
    return EsperClient(registry.base_url, token.key, timeout=10, retries=1, backoff=0.05)


@pytest.fixture
def make_loop(client):
    """Loop factory whose controllers are closed before the test database is flushed."""
    loops = []

    def make(**options):
        loops.append(Loop(client, **options))
        return loops[-1]

    yield make
    for loop in loops:
        loop.controller.close(timeout=5)


@pytest.fixture
def offline():
    """Kernels exported locally and served by an offline loader (no server): see _kernels.py."""
    from tests.kasmina._kernels import OfflineKernels

    kernels = OfflineKernels()
    yield kernels
    kernels.close()
