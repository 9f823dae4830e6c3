from __future__ import annotations

import copy
import io
import json
import zipfile

import pytest
import torch
from torch import nn

from tezzeret.catalogue import CATALOGUE, catalogue_entry
from tezzeret.compiler import (
    CompiledKernel,
    CompileError,
    KernelLoadError,
    build_module,
    compile_kernel,
    load_kernel,
)
from tezzeret.ir import SCHEMA_ID, Signature, param_count, validate_ir
from tezzeret.version import COMPILER_VERSION

REPORT_KEYS = {
    "batch_sizes", "spatial_sizes", "output_max_abs_at_init", "grad_check", "latency_us_p50",
    "latency_us_p99", "param_count", "torch_version", "compiler_version", "signature",
}  # fmt: skip


def fitting_signature(ir: dict, dtype: str = "float32") -> Signature:
    """A host that exercises IN != OUT wherever the graft allows it."""
    if ir["layout"] == "channels":
        return Signature(ir["graft"], "channels", 6, 8, dtype)
    return Signature(ir["graft"], "features", 24, 32, dtype)


def seed_input(sig: Signature, batch: int = 5, spatial: tuple[int, int] = (6, 7)) -> torch.Tensor:
    d = sig.out if sig.graft == "residual" else sig.in_
    shape = (batch, d, *spatial) if sig.layout == "channels" else (batch, d)
    return torch.randn(shape, dtype=getattr(torch, sig.dtype))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(1234)


@pytest.fixture(scope="module")
def compiled() -> dict[str, tuple[Signature, CompiledKernel]]:
    """Every catalogue blueprint compiled once for a fitting float32 signature."""
    result = {}
    for entry in CATALOGUE:
        sig = fitting_signature(entry["ir"])
        result[entry["name"]] = (sig, compile_kernel(entry["ir"], sig))
    return result


@pytest.mark.parametrize("name", [entry["name"] for entry in CATALOGUE])
def test_every_catalogue_entry_compiles_with_a_full_report(compiled, name):
    sig, kernel = compiled[name]
    assert kernel.size_bytes == len(kernel.artifact) > 0
    assert len(kernel.sha256) == 64
    assert kernel.compile_seconds > 0
    report = kernel.report
    assert set(report) >= REPORT_KEYS
    assert report["grad_check"] == "ok"
    assert report["batch_sizes"] == [1, 3, 16]
    assert report["compiler_version"] == COMPILER_VERSION
    assert report["torch_version"] == torch.__version__
    assert report["signature"] == sig.to_dict()
    assert report["latency_us_p99"] >= report["latency_us_p50"] > 0
    assert (
        report["param_count"] == kernel.param_count == param_count(catalogue_entry(name)["ir"], sig)
    )
    assert (report["spatial_sizes"] is None) == (sig.layout == "features")
    json.dumps(report)  # stored as JSON


@pytest.mark.parametrize("name", [entry["name"] for entry in CATALOGUE])
def test_reloaded_kernel_starts_at_zero_for_residual_grafts_and_keeps_shapes(compiled, name):
    sig, kernel = compiled[name]
    module = load_kernel(kernel.artifact)
    x = seed_input(sig)
    y = module(x)
    assert y.shape == (x.shape[0], sig.out, *x.shape[2:])
    if sig.graft == "residual":
        torch.testing.assert_close(y, torch.zeros_like(y), rtol=0, atol=0)
        assert kernel.report["output_max_abs_at_init"] == 0.0


@pytest.mark.parametrize("name", [entry["name"] for entry in CATALOGUE])
def test_arithmetic_param_count_matches_the_built_module(name):
    ir = catalogue_entry(name)["ir"]
    for width in (3, 8, 33):
        sig = Signature(ir["graft"], ir["layout"], width + 1, width, "float32")
        module = build_module(ir, sig)
        assert sum(p.numel() for p in module.parameters()) == param_count(ir, sig)


def test_train_step_changes_the_output(compiled):
    sig, kernel = compiled["residual-mlp-small"]
    module = load_kernel(kernel.artifact)
    x = seed_input(sig, batch=16)
    target = torch.randn(16, sig.out)
    before = module(x).detach()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(2):  # the zero-init last layer unblocks the hidden layer on the 2nd step
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(module(x), target)
        loss.backward()
        optimizer.step()
    after = module(x).detach()
    assert not torch.equal(before, after)
    assert nn.functional.mse_loss(after, target) < nn.functional.mse_loss(before, target)


def test_kernel_trained_state_survives_a_state_dict_round_trip(compiled):
    sig, kernel = compiled["conv1x1-bottleneck"]
    trained, fresh = load_kernel(kernel.artifact), load_kernel(kernel.artifact)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    fresh.load_state_dict(trained.state_dict())
    x = seed_input(sig)
    torch.testing.assert_close(fresh(x), trained(x))


def test_float64_signature_gives_a_float64_kernel():
    ir = catalogue_entry("norm-gated-residual")["ir"]
    sig = Signature("residual", "features", 16, 16, "float64")
    kernel = compile_kernel(ir, sig.to_dict(), batch_sizes=(2, 5))
    module = load_kernel(kernel.artifact)
    assert {p.dtype for p in module.parameters()} == {torch.float64}
    y = module(torch.randn(5, 16, dtype=torch.float64))
    assert y.dtype == torch.float64
    assert kernel.report["batch_sizes"] == [2, 5]


def test_channels_kernel_accepts_any_batch_and_spatial_size(compiled):
    sig, kernel = compiled["depthwise-separable"]
    module = load_kernel(kernel.artifact)
    module.eval()
    for shape in [(1, 8, 1, 1), (2, 8, 3, 11), (7, 8, 16, 16)]:
        assert module(torch.randn(shape)).shape == shape


def test_wrong_input_width_is_refused_by_the_kernel(compiled):
    sig, kernel = compiled["residual-mlp-wide"]
    module = load_kernel(kernel.artifact)
    with pytest.raises(RuntimeError, match="shape"):
        module(torch.randn(3, sig.out + 1))


MODE_IR = {
    "schema": SCHEMA_ID,
    "name": "bn-dropout",
    "graft": "residual",
    "layout": "features",
    "layers": [
        {"op": "linear", "out": "2 * D"},
        {"op": "batchnorm"},
        {"op": "dropout", "p": 0.5},
        {"op": "silu"},
        {"op": "linear", "out": "D", "init": "zeros"},
    ],
}


def test_train_and_eval_switch_batchnorm_and_dropout_like_eager_pytorch():
    sig = Signature("residual", "features", 8, 8, "float32")
    kernel = compile_kernel(MODE_IR, sig)
    assert any("batch 1" in note for note in kernel.report["notes"])
    module, eager = load_kernel(kernel.artifact), build_module(MODE_IR, sig)
    with torch.no_grad():  # make the output non-zero so modes are visible
        for m in (module, eager):
            dict(m.named_parameters())["4.weight"].fill_(0.1)
    x = torch.randn(32, 8)

    module.eval()
    eager.eval()
    torch.testing.assert_close(module(x), eager(x))
    torch.testing.assert_close(module(x), module(x))  # dropout is off

    module.train()
    eager.train()
    torch.manual_seed(7)
    y_module = module(x)
    torch.manual_seed(7)
    torch.testing.assert_close(y_module, eager(x))
    buffers, eager_buffers = dict(module.named_buffers()), dict(eager.named_buffers())
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(buffers[name], eager_buffers[name])
    assert int(buffers["1.num_batches_tracked"]) == 1
    assert not torch.equal(module(x), module(x))  # dropout is on

    module.eval()
    module(x)
    assert int(buffers["1.num_batches_tracked"]) == 3  # eval leaves the statistics alone
    eager(x)
    eager(x)
    eager.eval()
    torch.testing.assert_close(module(x), eager(x))  # eval uses the running statistics


def test_compile_is_deterministic_for_a_seed():
    ir = catalogue_entry("lowrank-adapter")["ir"]
    sig = Signature("parallel", "features", 12, 20, "float32")
    first, second = compile_kernel(ir, sig, seed=3), compile_kernel(ir, sig, seed=3)
    assert first.sha256 == second.sha256
    assert compile_kernel(ir, sig, seed=4).sha256 != first.sha256


def test_signature_mismatch_is_a_compile_error_naming_the_field():
    ir = validate_ir(catalogue_entry("squeeze-excite")["ir"])
    with pytest.raises(CompileError, match="^layout: "):
        compile_kernel(ir, Signature("residual", "features", 8, 8, "float32"))
    with pytest.raises(CompileError, match="^graft: "):
        compile_kernel(
            ir, {"graft": "parallel", "layout": "channels", "in": 8, "out": 8, "dtype": "float32"}
        )
    with pytest.raises(CompileError, match="signature.dtype"):
        compile_kernel(
            ir, {"graft": "residual", "layout": "channels", "in": 8, "out": 8, "dtype": "int8"}
        )


def _rewrite_member(artifact: bytes, name: str, change) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(artifact))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            target.writestr(info, change(data) if info.filename == name else data)
    return out.getvalue()


def test_archive_holds_no_pickles_and_pickled_payloads_are_refused(compiled):
    _, kernel = compiled["residual-mlp-small"]
    archive = zipfile.ZipFile(io.BytesIO(kernel.artifact))
    assert archive.getinfo("archive/data/sample_inputs/model.pt").file_size == 0
    config_name = "archive/data/weights/model_weights_config.json"

    def mark_pickled(data: bytes) -> bytes:
        config = json.loads(data)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()

    with pytest.raises(KernelLoadError, match="pickled"):
        load_kernel(_rewrite_member(kernel.artifact, config_name, mark_pickled))
    with pytest.raises(KernelLoadError, match="sample inputs"):
        load_kernel(
            _rewrite_member(kernel.artifact, "archive/data/sample_inputs/model.pt", lambda _: b"x")
        )
    with pytest.raises(KernelLoadError, match="zip"):
        load_kernel(b"not an archive")


def test_loaded_kernel_deep_copies_and_the_copy_switches_modes(compiled):
    sig, kernel = compiled["depthwise-separable"]
    module = load_kernel(kernel.artifact)
    snapshot = copy.deepcopy(module)
    snapshot.eval()
    assert not snapshot.training and module.training
    x = seed_input(sig)
    torch.testing.assert_close(snapshot(x), module.eval()(x))


def test_bad_batch_sizes_are_a_compile_error():
    with pytest.raises(CompileError, match="batch_sizes"):
        compile_kernel(
            catalogue_entry("lowrank-adapter")["ir"],
            fitting_signature({"graft": "parallel", "layout": "features"}),
            batch_sizes=(0,),
        )
