"""Models and loops researchers bring: sequence inputs, layers read by their parents,
large convolutions, restoring the best weights mid-run, copies, resumed runs, bad input."""

import copy
import io
import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina import Controller, Stage, wrap
from kasmina.client import EsperClient


class SeqMLP(nn.Module):
    """A token-wise MLP on [batch, seq, features], as in a Transformer block."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def _train(model, optimizer, x, steps=3):
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        model.step()


def _group_ids(optimizer) -> list[int]:
    return [id(p) for group in optimizer.param_groups for p in group["params"]]


# -- sequence inputs -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("blueprint", "graft", "layer", "dims"),
    [
        ("residual-mlp-small", "residual", "fc1", (16, 32)),
        ("lowrank-adapter", "parallel", "fc2", (32, 16)),
        ("bridge-mlp-4", "bridge", "fc2", (16, 16)),
    ],
)
def test_a_seed_on_a_linear_fed_a_sequence_applies_per_token(
    registry, compiled, blueprint, graft, layer, dims
):
    kernel = compiled(blueprint, graft, "features", *dims)
    model = wrap(SeqMLP(), client=registry, bridges={"fc2": "fc1"}, telemetry_every=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    assert model.load_kernel(layer, 0, kernel, optimizer=optimizer) is Stage.TRAINING
    x = torch.randn(4, 7, 16)
    _train(model, optimizer, x)
    model.advance(layer, 0, Stage.BLENDING)
    model.set_alpha(layer, 0, 1.0)
    out = model(x)
    assert out.shape == (4, 7, 16)
    # each token's output is the model's output on that token alone
    assert torch.allclose(out[:, 3], model(x[:, 3]), atol=1e-5)
    activation = model.health()["layers"][0]["activation"]
    assert activation is not None and 0.0 <= activation["dead_fraction"] <= 1.0


# -- layers whose parents read their weights -----------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.ff = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h, _ = self.attn(x, x, x)
        h = h + self.ff(h)
        return self.head(h.mean(1)) + 0 * self.head.weight.sum()  # reads .weight, like a tie


def test_attention_projections_are_not_seed_sites_and_wrapped_layers_keep_their_attributes():
    torch.manual_seed(0)
    plain = Tiny().eval()
    model = wrap(plain).eval()
    assert set(model.seed_layers) == {"ff", "head"}  # not attn.out_proj: MHA reads its weight
    x = torch.randn(3, 5, 16)
    assert torch.equal(model(x), plain(x))  # dormant: exactly the original
    head = model.model.head
    assert head.weight is head.host.weight and head.out_features == 4
    with pytest.raises(AttributeError, match="hosting Linear"):
        _ = head.no_such_thing
    with pytest.raises(ValueError, match="MultiheadAttention computes with its weight"):
        wrap(Tiny(), target=["attn.out_proj"])
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    wrapped = wrap(nn.Sequential(layer, nn.Linear(16, 4)))
    assert set(wrapped.seed_layers) == {"1"}


# -- convolutions wider than the old 8x8 probe ---------------------------------------------
def test_a_seed_grafts_on_a_conv_with_a_9x9_kernel(registry, compiled):
    kernel = compiled("conv1x1-bottleneck", "residual", "channels", 1, 4)
    net = nn.Sequential(nn.Conv2d(1, 4, 9), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    model = wrap(net, target=["0"], client=registry)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    assert model.load_kernel("0", 0, kernel, optimizer=optimizer) is Stage.TRAINING
    _train(model, optimizer, torch.randn(2, 1, 12, 12))
    assert model(torch.randn(2, 1, 12, 12)).shape == (2, 3)


# -- checkpoints mid-run ---------------------------------------------------------------------
def test_restoring_the_best_weights_mid_run_keeps_seeds_training(registry, compiled):
    kernel = compiled("residual-mlp-small", "residual", "features", 16, 32)
    model = wrap(SeqMLP(), client=registry, seeds_per_layer=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.attach_optimizer(optimizer)
    model.load_kernel("fc1", 0, kernel, optimizer=optimizer)
    x = torch.randn(8, 16)
    _train(model, optimizer, x)
    best = copy.deepcopy(model.state_dict())
    _train(model, optimizer, x)
    seed = model.seed_parameters("fc1", 0)
    model.load_state_dict(best)  # early stopping's "restore the best weights"
    assert model.seed_parameters("fc1", 0) == seed  # loaded in place, same tensors
    assert torch.equal(seed[0], best["model.fc1.seeds.0." + _first_param_name(model)])
    before = [p.detach().clone() for p in seed]
    _train(model, optimizer, x)
    assert any(not torch.equal(a, b) for a, b in zip(before, seed, strict=True))

    # a checkpoint whose seeds differ: the old ones leave the optimizer, the new ones join
    model.load_kernel("fc1", 1, kernel, optimizer=optimizer)
    later = copy.deepcopy(model.state_dict())
    model.unload_kernel("fc1", 1, optimizer=optimizer)
    model.load_state_dict(later)
    ids = set(_group_ids(optimizer))
    assert {id(p) for p in model.parameters()} == ids


def _first_param_name(model) -> str:
    return next(iter(dict(model.model.fc1.seeds["0"].named_parameters())))


def test_the_optimizer_keeps_seed_0_before_seed_1_whichever_was_grafted_first(
    registry, compiled, token
):
    small = compiled("residual-mlp-small", "residual", "features", 16, 32)
    adapter = compiled("lowrank-adapter", "parallel", "features", 16, 32)
    model = wrap(SeqMLP(), client=registry, seeds_per_layer=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.load_kernel("fc1", 1, small, optimizer=optimizer)
    model.load_kernel("fc1", 0, adapter, optimizer=optimizer)
    assert _group_ids(optimizer) == [id(p) for p in model.parameters()]
    _train(model, optimizer, torch.randn(8, 16))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    restored = wrap(SeqMLP(), client=EsperClient(registry.base_url, token.key), seeds_per_layer=2)
    restored.load_state_dict(state["model"])
    fresh = torch.optim.Adam(restored.parameters(), lr=0.01)
    fresh.load_state_dict(state["optimizer"])
    for (name, p), (same, q) in zip(
        model.named_parameters(), restored.named_parameters(), strict=True
    ):
        assert name == same
        assert torch.equal(optimizer.state[p]["exp_avg"], fresh.state[q]["exp_avg"]), name
    _train(restored, fresh, torch.randn(8, 16))


def test_a_wrapped_model_with_a_client_deep_copies_and_averages(registry, compiled):
    kernel = compiled("residual-mlp-small", "residual", "features", 16, 32)
    model = wrap(SeqMLP(), client=registry)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.load_kernel("fc1", 0, kernel, optimizer=optimizer)
    twin = copy.deepcopy(model)
    assert twin.loader is model.loader
    x = torch.randn(5, 16)
    assert torch.equal(twin(x), model(x))
    assert twin.seed_parameters()[0] is not model.seed_parameters()[0]
    averaged = torch.optim.swa_utils.AveragedModel(model)
    averaged.update_parameters(model)
    assert averaged(x).shape == (5, 16)


def test_a_resumed_run_judges_the_seeds_its_checkpoint_left_mid_lifecycle(
    registry, compiled, client, token
):
    kernel = compiled("residual-mlp-small", "residual", "features", 16, 32)
    model = wrap(SeqMLP(), client=registry, blend_steps=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.load_kernel("fc1", 0, kernel, optimizer=optimizer)
    x = torch.randn(8, 16)
    _train(model, optimizer, x)
    model.advance("fc1", 0, Stage.BLENDING)
    _train(model, optimizer, x, steps=3)
    assert model.layer("fc1").stages[0] is Stage.PROBATION
    state = model.state_dict()

    resumed = wrap(SeqMLP(), client=EsperClient(registry.base_url, token.key), blend_steps=2)
    resumed.load_state_dict(state)
    fresh = torch.optim.Adam(resumed.parameters(), lr=0.01)
    controller = Controller(
        resumed, fresh, client, total_steps=1_000, probation_steps=5, eval_fn=lambda: 0.5
    )
    try:
        assert controller.param_budget == sum(p.numel() for p in SeqMLP().parameters())
        for _ in range(6):
            fresh.zero_grad()
            loss = resumed(x).pow(2).mean()
            loss.backward()
            fresh.step()
            controller.step(loss)
        # judged (no contribution under a constant metric: culled), with nothing to report
        assert resumed.layer("fc1").stages[0] in (Stage.CULLED, Stage.EMBARGOED)
        assert controller.stats()["culled"] == 1 and controller.adaptations == []
        culls = [e["reason"] for e in resumed.events if e["to"] == "CULLED"]
        assert culls == ["contribution <= 0"]
    finally:
        controller.close(timeout=5)


# -- the Controller's input ----------------------------------------------------------------
def test_the_controller_samples_health_unless_told_otherwise_and_checks_what_it_is_given():
    model = wrap(SeqMLP())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller = Controller(model, optimizer, total_steps=100)
    assert model.telemetry_every == 10  # the policy reads per-layer health
    Controller(model, optimizer, total_steps=100, telemetry_every=3)
    assert model.telemetry_every == 3
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="telemetry_every must be a positive integer"):
            Controller(model, optimizer, total_steps=100, telemetry_every=bad)
    loss = model(torch.randn(4, 16)).pow(2).mean(1)
    with pytest.raises(ValueError, match=r"scalar loss; got a tensor of shape \(4,\)"):
        controller.step(loss)
    assert controller.steps == 0 and model.steps == 0
    controller.step(loss.mean())
    assert controller.steps == 1 and model.steps == 1


def test_a_refused_token_is_said_plainly_and_close_reports_it(registry, caplog):
    bad = EsperClient(registry.base_url, "not-a-token", retries=0)
    model = wrap(SeqMLP(), client=bad)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="kasmina"):
        controller = Controller(model, optimizer, bad, total_steps=100)
        controller.step(model(torch.randn(4, 16)).pow(2).mean())
        assert controller.close(timeout=5) is False
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("open run refused by the server") and "401" in m for m in messages)
    assert any("close run dropped: the run was never opened" in m for m in messages)


def test_wrapping_a_wrapped_model_says_to_wrap_once():
    model = wrap(SeqMLP())
    for again in (model, nn.Sequential(model.model)):
        with pytest.raises(ValueError, match="already wrapped"):
            wrap(again)
