"""A wrapped model under torch.compile(fullgraph=True): recompiles only at lifecycle moves."""

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

from kasmina import Stage, wrap


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _step(compiled, model, optimizer, x):
    optimizer.zero_grad()
    compiled(x).pow(2).mean().backward()
    optimizer.step()
    model.step()


def test_a_live_seed_does_not_recompile_per_step_and_alpha_changes_do_not_recompile(offline):
    kernel_id = offline.add("residual", "features", 16, 32)
    model = wrap(_mlp(), loader=offline.loader, blend_steps=1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    assert model.load_kernel("0", 0, kernel_id, optimizer=optimizer) is Stage.TRAINING
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(12, 16)
    for _ in range(10):  # TRAINING
        _step(compiled, model, optimizer, x)
    assert counter.frame_count == 1
    model.advance("0", 0, Stage.BLENDING)  # a lifecycle move: one recompile
    for i in range(10):
        model.set_alpha("0", 0, (i + 1) / 10)
        _step(compiled, model, optimizer, x)
    assert counter.frame_count <= 3
    layer = model.layer("0")
    h = layer.host(x)
    torch.testing.assert_close(compiled(x), model(x))
    torch.testing.assert_close(layer(x), h + layer.seeds["0"](h))


def test_a_dormant_model_sampling_telemetry_does_not_recompile_per_sample():
    model = wrap(_mlp(), telemetry_every=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(12, 16)
    for _ in range(20):
        _step(compiled, model, optimizer, x)
    assert counter.frame_count <= 3
    health = model.health()["layers"]
    assert all(layer["activation"] is not None for layer in health)  # sampled while compiled
