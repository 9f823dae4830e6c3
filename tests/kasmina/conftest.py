import pytest
import torch

from kasmina.client import EsperClient


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
