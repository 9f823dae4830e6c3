"""Seeds with kernels exported locally (no server; see _kernels.py): shared layers, frozen
hosts and LR schedulers, unbatched conv inputs, bridges under activation checkpointing."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kasmina import Stage, wrap
from kasmina._model import optimizer_add, optimizer_remove


def _ids(optimizer):
    return [[id(p) for p in group["params"]] for group in optimizer.param_groups]


def _train(model, optimizer, scheduler, x, n):
    for _ in range(n):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        model.step()


def test_a_live_seed_on_a_module_registered_twice_runs_in_both_uses(offline):
    fc = nn.Linear(16, 16)
    plain = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), fc, nn.ReLU(), fc, nn.ReLU(), nn.Linear(16, 3)
    )
    model = wrap(plain, loader=offline.loader)
    x = torch.randn(5, 8)
    assert torch.equal(model(x), plain(x))
    kernel_id = offline.add("residual", "features", 16, 16)
    assert model.load_kernel("2", 0, kernel_id) is Stage.TRAINING
    model.advance("2", 0, Stage.BLENDING)
    model.set_alpha("2", 0, 1.0)
    layer, seq = model.layer("2"), model.model
    assert seq[2] is layer and seq[4] is layer
    seed = layer.seeds["0"]

    def grown(t):
        h = layer.host(t)
        return h + seed(h)

    expected = seq[6].host(torch.relu(grown(torch.relu(grown(torch.relu(seq[0].host(x)))))))
    before = layer.forward_count
    torch.testing.assert_close(model(x), expected)
    assert layer.forward_count - before == 2  # the seed ran in both slots
    assert not torch.allclose(model(x), plain(x))


@pytest.mark.parametrize("schedule", ["onecycle", "lambda"])
def test_a_frozen_hosts_seed_joins_the_first_group_so_schedulers_keep_working(offline, schedule):
    plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    model = wrap(plain, loader=offline.loader)
    for p in model.layer("0").host.parameters():
        p.requires_grad_(False)  # a frozen host: not in the optimizer
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    if schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=40)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.95**step)
    x = torch.randn(12, 16)
    _train(model, optimizer, scheduler, x, 3)
    kernel_id = offline.add("residual", "features", 16, 32)
    assert model.load_kernel("0", 0, kernel_id, optimizer=optimizer) is Stage.TRAINING
    seed_params = model.seed_parameters("0", 0)
    assert len(optimizer.param_groups) == 1
    assert _ids(optimizer)[0][-len(seed_params) :] == [id(p) for p in seed_params]
    before = [p.detach().clone() for p in seed_params]
    _train(model, optimizer, scheduler, x, 5)  # a new group would raise in scheduler.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, seed_params, strict=True))
    model.unload_kernel("0", 0, optimizer=optimizer)
    _train(model, optimizer, scheduler, x, 3)
    assert _ids(optimizer) == [[id(p) for p in model.model[2].parameters()]]


def test_a_seed_of_a_host_another_optimizer_trains_joins_the_first_group():
    first, second, seed = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 4)
    optimizer = torch.optim.SGD(
        [{"params": second.parameters()}, {"params": [], "lr": 0.5}], lr=0.1, momentum=0.9
    )
    optimizer_add(optimizer, seed.parameters(), first)  # `first` is not in this optimizer
    assert _ids(optimizer) == [[id(p) for p in [*second.parameters(), *seed.parameters()]], []]
    optimizer_add(optimizer, seed.parameters(), first)  # already in: nothing changes
    assert len(_ids(optimizer)[0]) == 4


def test_removing_seeds_keeps_every_group_even_one_left_empty():
    host, seed = nn.Linear(4, 4), nn.Linear(4, 4)
    optimizer = torch.optim.Adam([{"params": host.parameters()}, {"params": seed.parameters()}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: 1.0, lambda s: 0.5])
    x = torch.randn(3, 4)
    for _ in range(2):
        optimizer.zero_grad()
        (host(x) + seed(x)).sum().backward()
        optimizer.step()
        scheduler.step()
    optimizer_remove(optimizer, seed.parameters())
    assert _ids(optimizer) == [[id(p) for p in host.parameters()], []]
    assert all(p not in optimizer.state for p in seed.parameters())
    for _ in range(2):  # an empty group steps, schedules and saves
        optimizer.zero_grad()
        host(x).sum().backward()
        optimizer.step()
        scheduler.step()
    fresh = torch.optim.Adam([{"params": host.parameters()}, {"params": []}])
    fresh.load_state_dict(optimizer.state_dict())


def test_an_unbatched_conv_input_runs_a_live_channels_seed(offline):
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    model = wrap(plain, loader=offline.loader)
    kernel_id = offline.add("residual", "channels", 3, 8)
    assert model.load_kernel("0", 0, kernel_id) is Stage.TRAINING
    model.advance("0", 0, Stage.BLENDING)
    model.set_alpha("0", 0, 0.5)
    x = torch.randn(3, 6, 6)
    model.layer("0").request_sample()  # telemetry on an unbatched input too
    out = model(x)
    assert out.shape == (4, 6, 6)
    torch.testing.assert_close(out, model(x.unsqueeze(0)).squeeze(0))
    assert not torch.allclose(out, plain(x))
    activation = model.health()["layers"][0]["activation"]
    assert 0.0 <= activation["dead_fraction"] <= 1.0


def test_a_bridge_under_checkpointing_of_the_consumer_alone_names_the_cause(offline):
    plain = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6))
    model = wrap(plain, loader=offline.loader)
    assert model.layer("2").bridge_source is model.layer("0")
    kernel_id = offline.add("bridge", "features", 10, 6)
    assert model.load_kernel("2", 0, kernel_id) is Stage.TRAINING
    seq, x = model.model, torch.randn(4, 10)
    out = checkpoint(seq[2], seq[1](seq[0](x)), use_reentrant=False)
    with pytest.raises(RuntimeError, match="activation checkpointing.*bridges=None"):
        out.sum().backward()
    # Checkpointing both layers together recomputes the source too: it works.
    out = checkpoint(seq, x, use_reentrant=False)
    out.sum().backward()
    assert all(p.grad is not None for p in model.seed_parameters("2", 0))
