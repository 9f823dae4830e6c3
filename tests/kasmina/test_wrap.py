"""wrap(): targets, no mutation of the caller's model, exact outputs while dormant."""

import copy

import pytest
import torch
from torch import nn

from kasmina import MorphableModel, SeedLayer, wrap

pytestmark = pytest.mark.fast


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Block(nn.Module):
    def __init__(self, shared: nn.Linear):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(16, 16), nn.GELU())
        self.shared = shared

    def forward(self, x):
        return self.shared(self.inner(x)) + x


class Nested(nn.Module):
    """Nested submodules, and one Linear shared by two blocks."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(16, 16)
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([Block(shared), Block(shared)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5)), torch.randn(6, 10)),
        (_cnn, torch.randn(2, 3, 12, 12)),
        (Nested, torch.randn(5, 8)),
    ],
    ids=["mlp", "cnn", "nested-shared"],
)
def test_dormant_outputs_and_gradients_equal_the_original_exactly(make, x):
    model = make()
    wrapped = wrap(model, seeds_per_layer=2)
    assert torch.equal(wrapped(x), model(x))
    model(x).sum().backward()
    wrapped(x).sum().backward()
    originals = dict(model.named_parameters())
    for name, p in wrapped.named_parameters():
        plain = name.removeprefix("model.").replace(".host.", ".")
        assert torch.equal(p.grad, originals[plain].grad), name


def test_the_callers_model_is_not_mutated():
    model = Nested()
    before = copy.deepcopy(model.state_dict())
    modules_before = [type(m) for m in model.modules()]
    wrapped = wrap(model)
    assert [type(m) for m in model.modules()] == modules_before
    with torch.no_grad():
        for p in wrapped.parameters():
            p.add_(1.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_a_shared_layer_becomes_one_shared_seed_layer():
    wrapped = wrap(Nested())
    blocks = wrapped.model.blocks
    assert isinstance(blocks[0].shared, SeedLayer)
    assert blocks[0].shared is blocks[1].shared
    assert sorted(wrapped.seed_layers) == [
        "blocks.0.inner.0",
        "blocks.0.shared",
        "blocks.1.inner.0",
        "head",
        "stem",
    ]


def test_targets_by_type_and_by_name():
    model = _cnn()
    convs = wrap(model, target=nn.Conv2d)
    assert list(convs.seed_layers) == ["0", "2"]
    named = wrap(model, target=["5"])
    assert list(named.seed_layers) == ["5"]
    assert named.layer("5").signature == {"layout": "features", "in": 8, "out": 4}
    assert convs.layer("2").signature == {"layout": "channels", "in": 8, "out": 8}


def test_unknown_layer_name_says_which_layers_exist():
    with pytest.raises(ValueError, match="layers that can host seeds: 0, 2"):
        wrap(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), target=["fc9"])


def test_a_name_that_is_not_linear_or_conv_is_refused():
    with pytest.raises(ValueError, match="nn.Linear"):
        wrap(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), target=["1"])


def test_wrong_seed_index_and_unknown_layer_are_value_errors():
    wrapped = wrap(nn.Sequential(nn.Linear(4, 4)), seeds_per_layer=2)
    with pytest.raises(ValueError, match="seeds 0..1"):
        wrapped.unload_kernel("0", 2)
    with pytest.raises(ValueError, match="seed layers: 0"):
        wrapped.layer("decoder")


def test_loading_without_a_registry_says_how_to_configure_one():
    wrapped = wrap(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="EsperClient"):
        wrapped.load_kernel("0", 0, "00000000-0000-0000-0000-000000000001")


def test_wrapped_model_is_a_module_with_state():
    wrapped = wrap(nn.Sequential(nn.Linear(4, 4)), seeds_per_layer=3)
    assert isinstance(wrapped, MorphableModel)
    state = wrapped.state_dict()
    assert state["model.0.seed_stage"].tolist() == [0, 0, 0]
    assert state["model.0.seed_kernel_id"].shape == (3, 2)


def test_dormant_wrapped_mlp_compiles_without_graph_breaks():
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    wrapped = wrap(model)
    x = torch.randn(32, 784)
    compiled = torch.compile(wrapped, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    explanation = torch._dynamo.explain(wrapped)(x)
    assert explanation.graph_break_count == 0


def test_kasmina_imports_no_django_and_none_of_the_server_apps():
    import subprocess
    import sys

    code = (
        "import sys, kasmina, kasmina.client, kasmina.cache, kasmina.loader;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'django', 'rest_framework', 'celery', 'urza', 'tezzeret', 'tamiyo', 'esper_site'});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_bridges_join_linear_layers_that_feed_each_other_in_a_sequential():
    mlp = nn.Sequential(
        nn.Linear(10, 8),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(8, 6),
        nn.LayerNorm(6),
        nn.Linear(6, 3),
    )
    model = wrap(mlp)
    sources = {name: layer.bridge_source for name, layer in model.seed_layers.items()}
    # fc "3" is fed by "0" through parameter-free modules; a LayerNorm (parameters) breaks the chain.
    assert sources["0"] is None and sources["5"] is None
    assert sources["3"] is model.layer("0")
    assert model.layer("3").graft_dims("bridge") == (10, 6)
    assert [layer["bridge_from"] for layer in model.health()["layers"]] == [None, "0", None]


def test_bridges_can_be_named_or_switched_off_and_bad_ones_are_value_errors():
    mlp = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    assert all(
        layer.bridge_source is None for layer in wrap(mlp, bridges=None).seed_layers.values()
    )
    named = wrap(mlp, bridges={"4": "0"})
    assert named.layer("4").bridge_source is named.layer("0")
    assert named.layer("2").bridge_source is None
    with pytest.raises(ValueError, match="no bridge source"):
        named.layer("2").graft_dims("bridge")
    with pytest.raises(ValueError, match="no seed layer 'fc9'"):
        wrap(mlp, bridges={"4": "fc9"})
    with pytest.raises(ValueError, match="'0' feeds more than one bridge site"):
        wrap(mlp, bridges={"2": "0", "4": "0"})
    with pytest.raises(ValueError, match="bridges must be 'auto', None or a mapping"):
        wrap(mlp, bridges="all")
    for model, bridges in ((mlp, {"2": "2"}), (_cnn(), {"5": "0"})):  # itself; a Conv2d
        with pytest.raises(ValueError, match="a bridge joins two different nn.Linear layers"):
            wrap(model, bridges=bridges)


def test_a_module_registered_twice_in_one_parent_gets_its_seed_layer_in_both_slots():
    fc = nn.Linear(16, 16)
    plain = nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), fc, nn.ReLU(), fc, nn.ReLU(), nn.Linear(16, 3)
    )
    wrapped = wrap(plain)
    seq = wrapped.model
    assert isinstance(seq[2], SeedLayer) and seq[2] is seq[4]
    assert list(wrapped.seed_layers) == ["0", "2", "6"]
    # A layer that runs twice per forward pass takes part in no automatic bridge.
    assert all(layer.bridge_source is None for layer in wrapped.seed_layers.values())
    x = torch.randn(5, 8)
    assert torch.equal(wrapped(x), plain(x))

    class TwoNames(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    two = wrap(TwoNames())
    assert isinstance(two.model.a, SeedLayer) and two.model.a is two.model.b


def test_a_lazy_layer_must_be_materialised_before_wrap():
    lazy = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"layer '0' \(LazyLinear\).*run one forward pass"):
        wrap(lazy)
    with pytest.raises(ValueError, match="run one forward pass"):
        wrap(nn.Sequential(nn.LazyConv2d(4, 3)))
    lazy(torch.randn(3, 5))  # materialised: it wraps, with its real width
    assert wrap(lazy).layer("0").signature == {"layout": "features", "in": 5, "out": 8}


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"seeds_per_layer": 0}, ValueError, "seeds_per_layer must be an int between 1 and 16"),
        ({"seeds_per_layer": 17}, ValueError, "seeds_per_layer must be an int between 1 and 16"),
        ({"seeds_per_layer": True}, TypeError, "seeds_per_layer must be an int between 1 and 16"),
        ({"seeds_per_layer": 2.0}, TypeError, "seeds_per_layer must be an int .*float"),
        ({"seeds_per_layer": "2"}, TypeError, "seeds_per_layer must be an int .*str"),
        ({"telemetry_every": -1}, ValueError, "telemetry_every must be an int >= 0"),
        ({"telemetry_every": 0.5}, TypeError, "telemetry_every must be an int >= 0"),
        ({"blend_steps": 0}, ValueError, "blend_steps must be an int >= 1"),
        ({"blend_steps": 10.0}, TypeError, "blend_steps must be an int >= 1"),
        ({"embargo_steps": -1}, ValueError, "embargo_steps must be an int >= 0"),
        ({"embargo_steps": None}, TypeError, "embargo_steps must be an int >= 0"),
        ({"max_failures": 0}, ValueError, "max_failures must be an int >= 1"),
        ({"max_failures": False}, TypeError, "max_failures must be an int >= 1"),
    ],
)
def test_bad_wrap_options_say_what_to_pass(options, error, message):
    with pytest.raises(error, match=message):
        wrap(nn.Sequential(nn.Linear(4, 4)), **options)


def test_wrap_option_bounds_are_accepted():
    model = wrap(
        nn.Sequential(nn.Linear(4, 4)),
        seeds_per_layer=16,
        telemetry_every=0,
        blend_steps=1,
        embargo_steps=0,
        max_failures=1,
    )
    assert model.layer("0").num_seeds == 16 and model.blend_steps == 1


def test_target_as_a_list_of_types_is_like_a_tuple_of_them():
    model = _cnn()
    assert list(wrap(model, target=[nn.Conv2d]).seed_layers) == ["0", "2"]
    assert list(wrap(model, target=[nn.Conv2d, nn.Linear]).seed_layers) == ["0", "2", "5"]
    with pytest.raises(TypeError, match=r"list or tuple of module types \(e.g. \[nn.Linear\]\)"):
        wrap(model, target=[nn.Conv2d, "5"])


def test_the_root_module_cannot_host_seeds_and_the_error_says_to_wrap_a_container():
    for target in ((nn.Linear, nn.Conv2d), nn.Linear, [nn.Linear], [""]):
        with pytest.raises(
            ValueError, match=r"root module \(Linear\) cannot host seeds.*Sequential"
        ):
            wrap(nn.Linear(3, 3), target=target)
    wrapped = wrap(nn.Sequential(nn.Linear(3, 3)))
    assert list(wrapped.seed_layers) == ["0"]
