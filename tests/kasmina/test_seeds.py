"""Seeds with real kernels from a live registry: grafting, lifecycle, failures, telemetry."""

import copy
import time

import pytest
import torch
from torch import nn

from kasmina import IllegalTransition, Stage, wrap
from kasmina.client import EsperClient


def _mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _group_ids(optimizer):
    return [{id(p) for p in group["params"]} for group in optimizer.param_groups]


def _train_steps(model, optimizer, n=3, x=None):
    x = torch.randn(12, 16) if x is None else x
    for _ in range(n):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        if hasattr(model, "step"):
            model.step()


def test_a_training_seed_leaves_the_output_equal_to_the_host_and_learns(registry, compiled):
    kernel_id = compiled("residual-mlp-small", "residual", "features", 16, 32)
    plain = _mlp()
    model = wrap(plain, client=registry)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert model.load_kernel("0", 0, kernel_id, optimizer=optimizer) is Stage.TRAINING
    seed_params = model.seed_parameters("0", 0)
    # The seed joins the group of its host layer's parameters: no new param group.
    assert seed_params and _group_ids(optimizer) == [{id(p) for p in model.parameters()}]

    x = torch.randn(12, 16)
    assert torch.equal(model(x), plain(x))
    model(x).pow(2).mean().backward()
    plain(x).pow(2).mean().backward()
    assert torch.equal(model.model[0].host.weight.grad, plain[0].weight.grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in seed_params)
    before = [p.detach().clone() for p in seed_params]
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, seed_params, strict=True))
    model.step()
    host_only = model.model[2](torch.relu(model.model[0].host(x)))
    assert torch.equal(model(x), host_only), "TRAINING must not change the forward output"


def test_blending_ramps_alpha_then_probation_then_fossilized(registry, compiled):
    kernel_id = compiled("residual-mlp-small", "residual", "features", 16, 32)
    model = wrap(_mlp(), client=registry, blend_steps=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.load_kernel("0", 0, kernel_id, optimizer=optimizer)
    _train_steps(model, optimizer, n=5)
    model.advance("0", 0, Stage.BLENDING)
    alphas = []
    for _ in range(4):
        model.step()
        alphas.append(model.layer("0").alphas[0])
    assert alphas == [0.25, 0.5, 0.75, 1.0]
    assert model.layer("0").stages[0] is Stage.PROBATION
    model.advance("0", 0, Stage.FOSSILIZED)
    x = torch.randn(3, 16)
    layer = model.layer("0")
    h = layer.host(x)
    expected = h + layer.seeds["0"](h)
    torch.testing.assert_close(layer(x), expected)
    assert not torch.equal(layer(x), h)


def test_culling_restores_the_host_output_exactly_then_embargo_then_dormant(registry, compiled):
    kernel_id = compiled("residual-mlp-small", "residual", "features", 16, 32)
    plain = _mlp()
    model = wrap(plain, client=registry, blend_steps=2, embargo_steps=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.load_kernel("0", 0, kernel_id, optimizer=optimizer)
    _train_steps(model, optimizer, n=3)
    model.advance("0", 0, Stage.BLENDING)
    model.step()
    model.step()
    x = torch.randn(5, 16)
    host_only = model.model[2](torch.relu(model.model[0].host(x)))
    assert not torch.equal(model(x), host_only)
    model.unload_kernel("0", 0, optimizer=optimizer)
    assert torch.equal(model(x), host_only)
    assert _group_ids(optimizer) == [{id(p) for p in model.parameters()}]
    assert not model.seed_parameters()
    stages = []
    for _ in range(5):
        model.step()
        stages.append(model.layer("0").stages[0])
    assert stages[0] is Stage.EMBARGOED and stages[-1] is Stage.DORMANT
    assert model.layer("0").kernel_ids[0] is None


@pytest.mark.parametrize("schedule", ["lambda", "onecycle", "plateau"])
def test_lr_schedulers_keep_working_and_seeds_train_at_the_scheduled_rate(
    registry, compiled, schedule
):
    # LambdaLR and OneCycleLR keep one entry per param group from their construction and
    # fail on a group added later; the seed joins its host's group, at its current rate.
    kernel_id = compiled("residual-mlp-small", "residual", "features", 16, 32)
    model = wrap(_mlp(), client=registry, blend_steps=2, embargo_steps=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    if schedule == "lambda":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)
    elif schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=40)
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)

    def steps(n):
        for _ in range(n):
            _train_steps(model, optimizer, n=1)
            scheduler.step(1.0) if schedule == "plateau" else scheduler.step()

    steps(5)
    rate = optimizer.param_groups[0]["lr"]
    assert model.load_kernel("0", 0, kernel_id, optimizer=optimizer) is Stage.TRAINING
    seed_params = model.seed_parameters("0", 0)
    (group,) = optimizer.param_groups
    assert group["lr"] == rate and group["weight_decay"] == 0.1
    assert {id(p) for p in seed_params} <= {id(p) for p in group["params"]}
    before = [p.detach().clone() for p in seed_params]
    steps(5)
    assert optimizer.param_groups[0]["lr"] != rate  # the schedule moved the seed's rate too
    assert any(not torch.equal(a, b) for a, b in zip(before, seed_params, strict=True))
    model.unload_kernel("0", 0, optimizer=optimizer)
    steps(5)  # and goes on after the cull
    assert _group_ids(optimizer) == [{id(p) for p in model.parameters()}]


def test_seeds_join_the_group_in_model_order_so_optimizer_state_reloads(registry, compiled):
    first = compiled("residual-mlp-small", "residual", "features", 32, 8)
    second = compiled("residual-mlp-small", "residual", "features", 16, 32)
    model = wrap(_mlp(), client=registry, seeds_per_layer=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _train_steps(model, optimizer)
    # Grafted out of forward order: the last layer first, then the first layer's seed 1, 0.
    model.load_kernel("2", 0, first, optimizer=optimizer)
    model.load_kernel("0", 1, second, optimizer=optimizer)
    model.load_kernel("0", 0, second, optimizer=optimizer)
    _train_steps(model, optimizer)
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [
        id(p) for p in model.parameters()
    ]
    # So a saved optimizer state loads into one made afresh from model.parameters().
    fresh = torch.optim.Adam(model.parameters(), lr=0.01)
    fresh.load_state_dict(optimizer.state_dict())
    for p in model.parameters():
        assert fresh.state[p]["exp_avg"].shape == p.shape
    _train_steps(model, fresh)


def test_grafted_seeds_train_under_autocast(registry, compiled):
    kernel_id = compiled("residual-mlp-small", "residual", "features", 16, 32)
    model = wrap(_mlp(), client=registry, blend_steps=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.load_kernel("0", 0, kernel_id, optimizer=optimizer)
    seed_params = model.seed_parameters("0", 0)
    before = [p.detach().clone() for p in seed_params]
    for stage in (Stage.TRAINING, Stage.BLENDING):
        if stage is Stage.BLENDING:
            model.advance("0", 0, stage)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(4, 16))
        assert out.dtype == torch.bfloat16 and out.isfinite().all()
        optimizer.zero_grad()
        out.float().pow(2).mean().backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in seed_params)
        optimizer.step()
        model.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, seed_params, strict=True))


def test_lbfgs_trains_seeds_that_come_and_go(registry, compiled):
    # L-BFGS has one param group and one history over all parameters flattened.
    kernel_id = compiled("residual-mlp-small", "residual", "features", 16, 32)
    model = wrap(_mlp(), client=registry)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    x = torch.randn(12, 16)

    def closure():
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    model.load_kernel("0", 0, kernel_id, optimizer=optimizer)
    seed_params = model.seed_parameters("0", 0)
    before = [p.detach().clone() for p in seed_params]
    optimizer.step(closure)  # a stale history of the wrong length would raise here
    assert any(not torch.equal(a, b) for a, b in zip(before, seed_params, strict=True))
    model.unload_kernel("0", 0, optimizer=optimizer)
    optimizer.step(closure)
    assert _group_ids(optimizer) == [{id(p) for p in model.parameters()}]


def test_a_frozen_hosts_seed_joins_the_first_group():
    from kasmina._model import optimizer_add

    frozen, trained = nn.Linear(4, 4), nn.Linear(4, 2)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
    seed = nn.Linear(4, 4)
    optimizer_add(optimizer, seed.parameters(), frozen)
    # No new group (LR schedulers keep one entry per group): the first group takes them.
    assert _group_ids(optimizer) == [
        {id(p) for p in trained.parameters()} | {id(p) for p in seed.parameters()}
    ]
    optimizer_add(optimizer, seed.parameters(), frozen)  # already in: nothing changes
    optimizer_add(optimizer, seed.parameters(), trained)
    assert [len(g) for g in _group_ids(optimizer)] == [4]


def test_parallel_graft_adds_alpha_times_seed_of_the_input(registry, compiled):
    kernel_id = compiled("lowrank-adapter", "parallel", "features", 16, 32)
    model = wrap(_mlp(), client=registry)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.load_kernel("0", 0, kernel_id, optimizer=optimizer)
    _train_steps(model, optimizer, n=3)
    model.advance("0", 0, Stage.BLENDING)
    model.set_alpha("0", 0, 0.5)
    layer = model.layer("0")
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), layer.host(x) + 0.5 * layer.seeds["0"](x))


def test_a_bridge_seed_widens_the_hidden_layer_between_two_linears(registry, compiled, token):
    kernel_id = compiled("bridge-mlp-4", "bridge", "features", 16, 8)  # "0".in -> "2".out
    mlp = _mlp()
    model = wrap(mlp, client=registry)
    first, second = model.layer("0"), model.layer("2")
    assert second.bridge_source is first
    with pytest.raises(ValueError, match="has no bridge source"):
        model.load_kernel("0", 0, kernel_id)  # the first layer has nothing feeding it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    assert model.load_kernel("2", 0, kernel_id, optimizer=optimizer) is Stage.TRAINING
    x = torch.randn(12, 16)
    assert torch.equal(model(x), mlp(x))  # TRAINING: the output is still the host's
    seed = second.seeds["0"]
    before = [p.detach().clone() for p in seed.parameters()]
    _train_steps(model, optimizer, n=3, x=x)
    assert any(not torch.equal(a, b) for a, b in zip(before, seed.parameters(), strict=True))
    model.advance("2", 0, Stage.BLENDING)
    model.set_alpha("2", 0, 0.5)
    hidden = torch.relu(first.host(x))
    torch.testing.assert_close(model(x), second.host(hidden) + 0.5 * seed(x))
    assert first._tapped is None  # the stashed input is dropped once read
    # A checkpoint restores the bridge in a fresh wrap of the same model.
    restored = wrap(_mlp(), client=EsperClient(registry.base_url, token.key))
    restored.load_state_dict(model.state_dict())
    assert restored.layer("2").grafts[0] == "bridge"
    assert torch.equal(restored(x), model(x))
    # Culled: the first layer stops keeping its input and the output is the host's again.
    model.advance("2", 0, Stage.PROBATION)
    model.advance("2", 0, Stage.CULLED)
    assert first._taps == 0 and not first._active
    torch.testing.assert_close(model(x), second.host(hidden))


def test_conv_layers_take_channel_kernels(registry, compiled):
    kernel_id = compiled("conv1x1-bottleneck", "residual", "channels", 8, 8)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    model = wrap(cnn, target=nn.Conv2d, client=registry)
    assert model.load_kernel("2", 0, kernel_id) is Stage.TRAINING
    x = torch.randn(2, 3, 10, 10)
    assert torch.equal(model(x), cnn(x))


def test_a_kernel_that_does_not_fit_is_a_value_error_and_the_seed_stays_dormant(registry, compiled):
    kernel_id = compiled("residual-mlp-small", "residual", "features", 16, 16)
    model = wrap(_mlp(), client=registry)
    with pytest.raises(ValueError, match=r"does not fit layer '2'.*'in': 32, 'out': 8"):
        model.load_kernel("2", 0, kernel_id)
    assert model.layer("2").stages[0] is Stage.DORMANT


def test_illegal_lifecycle_moves_raise(registry, compiled):
    kernel_id = compiled("residual-mlp-small", "residual", "features", 16, 32)
    model = wrap(_mlp(), client=registry)
    model.load_kernel("0", 0, kernel_id)
    with pytest.raises(IllegalTransition, match="TRAINING to FOSSILIZED"):
        model.advance("0", 0, Stage.FOSSILIZED)
    with pytest.raises(ValueError, match="not DORMANT"):
        model.load_kernel("0", 0, kernel_id)
    with pytest.raises(ValueError, match="BLENDING"):
        model.set_alpha("0", 0, 0.3)


def test_a_non_finite_seed_falls_back_to_the_host_is_retried_then_culled(registry, compiled):
    kernel_id = compiled("residual-mlp-small", "residual", "features", 16, 32)
    plain = _mlp()
    model = wrap(plain, client=registry, max_failures=2)
    model.load_kernel("0", 0, kernel_id)
    x = torch.randn(4, 16)
    layer = model.layer("0")
    for attempt in range(2):
        with torch.no_grad():
            for p in model.seed_parameters("0", 0):
                p.fill_(float("nan"))
        out = model(x)
        assert torch.isfinite(out).all()
        assert torch.equal(out, plain(x))
        model.step()
        if attempt == 0:
            assert layer.stages[0] is Stage.ERROR_RECOVERY
            assert torch.equal(model(x), plain(x))
            deadline = time.monotonic() + 10
            while layer.stages[0] is not Stage.TRAINING and time.monotonic() < deadline:
                time.sleep(0.05)
                model.step()
            assert layer.stages[0] is Stage.TRAINING, "the seed is retried with a fresh kernel"
            assert all(torch.isfinite(p).all() for p in model.seed_parameters("0", 0))
    assert layer.stages[0] is Stage.CULLED
    assert layer.error_counts[0] == 2
    assert torch.equal(model(x), plain(x))


def test_a_registry_that_is_down_does_not_stop_training_and_loading_is_retried(compiled, registry):
    kernel_id = compiled("residual-mlp-small", "residual", "features", 16, 32)
    down = EsperClient("http://127.0.0.1:1", "token", timeout=0.5, retries=0)
    model = wrap(_mlp(), client=down, max_failures=5)
    assert model.load_kernel("0", 0, kernel_id) is Stage.ERROR_RECOVERY
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_steps(model, optimizer, n=3)
    assert model.layer("0").error_counts[0] >= 1
    # The registry comes back: the next retry loads the kernel.
    model.loader.client = registry
    model.loader.reset(kernel_id)
    model._retry_at[("0", 0)] = 0.0
    deadline = time.monotonic() + 15
    while model.layer("0").stages[0] is not Stage.TRAINING and time.monotonic() < deadline:
        model.step()
        time.sleep(0.05)
    assert model.layer("0").stages[0] is Stage.TRAINING


def test_telemetry_reports_activation_gradients_and_seed_state(registry, compiled):
    kernel_id = compiled("residual-mlp-small", "residual", "features", 16, 32)
    model = wrap(_mlp(), client=registry, telemetry_every=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.load_kernel("0", 0, kernel_id, optimizer=optimizer)
    _train_steps(model, optimizer, n=4)
    health = model.health()
    first, last = health["layers"]
    assert health["step"] == 4
    assert first["name"] == "0" and first["in"] == 16 and first["out"] == 32
    assert set(first["activation"]) == {"mean", "std", "dead_fraction"}
    assert 0.0 <= first["activation"]["dead_fraction"] <= 1.0
    assert first["grad_norm"] > 0 and last["grad_norm"] > 0
    seed = first["seeds"][0]
    assert seed["stage"] == "TRAINING" and seed["kernel_id"] == kernel_id
    assert seed["latency_us"] > 0 and seed["params"] > 0
    stats = model.stats()
    assert stats["layers"][0]["seeds_by_stage"] == {"TRAINING": 1}
    assert stats["layers"][0]["forward_count"] >= 4
    assert stats["cache"]["hits"] + stats["cache"]["misses"] >= 1


def test_health_is_plain_data(registry, compiled):
    import json

    model = wrap(_mlp(), client=registry, telemetry_every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_steps(model, optimizer, n=2)
    json.dumps(model.health())
    json.dumps(model.stats())
    copy.deepcopy(model.health())
