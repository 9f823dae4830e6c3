"""Checkpoints carry grafted seeds; a new process reproduces the outputs exactly."""

import io
import subprocess
import sys
import textwrap

import torch
from torch import nn

from kasmina import Stage, wrap

MODEL_SRC = """
import torch
from torch import nn

def make_model():
    torch.manual_seed(123)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
"""

namespace: dict = {}
exec(MODEL_SRC, namespace)  # the same model definition the child process uses
make_model = namespace["make_model"]


def _trained_model(registry, compiled):
    small = compiled("residual-mlp-small", "residual", "features", 16, 32)
    adapter = compiled("lowrank-adapter", "parallel", "features", 32, 32)
    model = wrap(make_model(), client=registry, seeds_per_layer=2, blend_steps=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.load_kernel("0", 1, small, optimizer=optimizer)
    model.load_kernel("2", 0, adapter, optimizer=optimizer)
    x = torch.randn(32, 16)
    for _ in range(6):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        model.step()
    model.advance("0", 1, Stage.BLENDING)
    model.step()
    model.step()
    return model


def test_a_checkpoint_restores_grafted_seeds_in_a_fresh_wrap_with_an_empty_cache(
    registry, compiled, token
):
    model = _trained_model(registry, compiled)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    restored = wrap(
        make_model(),
        client=type(registry)(registry.base_url, token.key),
        seeds_per_layer=2,
        blend_steps=4,
    )
    restored.load_state_dict(state)
    x = torch.randn(7, 16)
    assert torch.equal(restored(x), model(x))
    assert restored.layer("0").stages == [Stage.DORMANT, Stage.BLENDING]
    assert restored.layer("0").alphas[1] == model.layer("0").alphas[1] == 0.5
    assert restored.layer("2").stages[0] is Stage.TRAINING


def test_a_new_process_that_wraps_the_same_model_reproduces_outputs_exactly(
    registry, compiled, token, tmp_path
):
    model = _trained_model(registry, compiled)
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    x = torch.randn(9, 16)
    torch.save(x, tmp_path / "x.pt")
    child = textwrap.dedent(
        f"""
        import sys, torch
        {MODEL_SRC.strip().replace(chr(10), chr(10) + "        ")}
        from kasmina import wrap
        from kasmina.client import EsperClient
        model = wrap(make_model(), client=EsperClient(sys.argv[1], sys.argv[2]), seeds_per_layer=2)
        model.load_state_dict(torch.load(sys.argv[3], weights_only=True))
        x = torch.load(sys.argv[4], weights_only=True)
        with torch.no_grad():
            torch.save(model(x), sys.argv[5])
        """
    )
    script = tmp_path / "child.py"
    script.write_text(child)
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            registry.base_url,
            token.key,
            str(tmp_path / "ckpt.pt"),
            str(tmp_path / "x.pt"),
            str(tmp_path / "y.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), expected)


def test_a_dormant_checkpoint_loads_into_a_model_without_a_registry():
    model = wrap(make_model())
    restored = wrap(make_model())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    restored.load_state_dict(model.state_dict())
    x = torch.randn(3, 16)
    assert torch.equal(restored(x), model(x))
    assert isinstance(restored.model[0].host, nn.Linear)
