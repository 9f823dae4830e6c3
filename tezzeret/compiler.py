"""Compile a blueprint for one signature into a validated ``torch.export`` archive (``.pt2``).

Pipeline: resolve the IR -> build and initialise the module -> cast to the signature's
dtype -> ``torch.export.export`` with a dynamic batch dim (and dynamic H, W for the
``channels`` layout) -> ``torch.export.save`` into bytes -> reload those bytes with
`load_kernel` and validate the reloaded module. Nothing is pickled: the archive holds
JSON graph and raw tensor payloads only (the example inputs, a ``torch.save`` blob, are
dropped before saving).

Train/eval: the module ``ExportedProgram.module()`` returns raises on ``.train()`` and
``.eval()`` in torch 2.13, and the traced graph has the training flags of dropout and
batch norm baked in as constants. `load_kernel` rewrites those two ops into stateless
submodules that read ``self.training``, so ``.train()``/``.eval()`` work like on any
``nn.Module``; compilation checks the reloaded module against the eager one in both modes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kasmina._artifact import KernelLoadError, load_kernel
from tezzeret import _blocks
from tezzeret.ir import IRError, Signature, param_count, parse_signature, resolve
from tezzeret.signature import DTYPES
from tezzeret.version import COMPILER_VERSION

__all__ = [
    "CompileError",
    "CompiledKernel",
    "KernelLoadError",
    "build_module",
    "compile_kernel",
    "load_kernel",
]

logger = logging.getLogger(__name__)

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
# What torch raises for a module it cannot export, run or differentiate. Deliberately not
# `Exception`: a worker's time limit (celery's SoftTimeLimitExceeded) must pass through.
_TORCH_FAILURES = (
    RuntimeError,
    ValueError,
    TypeError,
    ArithmeticError,
    LookupError,
    AssertionError,
)
EXPORT_BATCH = 4
EXPORT_SPATIAL = (8, 8)
SPATIAL_SIZES = ((8, 8), (5, 7))
LATENCY_BATCH = 16
LATENCY_RUNS = 100


class CompileError(Exception):
    """A deterministic compile failure: the kernel is rejected with ``str(error)``."""


@dataclass
class CompiledKernel:
    artifact: bytes
    sha256: str
    size_bytes: int
    param_count: int
    report: dict
    compile_seconds: float


def build_module(ir: dict, sig: Signature, *, seed: int = 0) -> nn.Module:
    """Resolve ``ir`` for ``sig`` and build the seed in float32, initialised from ``seed``.

    Raises `IRError` when the blueprint does not fit the signature.
    """
    resolved = resolve(ir, sig)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _blocks.build(resolved["layers"], sig.width, resolved["layout"])


def _example(
    sig: Signature, batch: int, spatial: tuple[int, int] | None, gen: torch.Generator
) -> torch.Tensor:
    shape = (batch, sig.width) if spatial is None else (batch, sig.width, *spatial)
    return torch.randn(shape, generator=gen).to(TORCH_DTYPES[sig.dtype])


def _export(module: nn.Module, sig: Signature) -> bytes:
    channels = sig.layout == "channels"
    dims = {0: torch.export.Dim("batch", min=1)}
    if channels:
        dims |= {2: torch.export.Dim("height", min=1), 3: torch.export.Dim("width", min=1)}
    example = _example(
        sig, EXPORT_BATCH, EXPORT_SPATIAL if channels else None, torch.Generator().manual_seed(0)
    )
    module.train()
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=(dims,))
    except _TORCH_FAILURES as exc:
        raise CompileError(f"torch.export failed: {type(exc).__name__}: {exc}") from exc
    program.example_inputs = None  # saved as a torch.save pickle otherwise
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def _expect_output(y: torch.Tensor, x: torch.Tensor, sig: Signature, what: str) -> None:
    expected = (x.shape[0], sig.out, *x.shape[2:])  # D = OUT for residual grafts
    if tuple(y.shape) != expected:
        raise CompileError(f"{what}: output shape {tuple(y.shape)}, expected {expected}")
    if y.dtype != x.dtype:
        raise CompileError(f"{what}: output dtype {y.dtype}, expected {x.dtype}")
    if not torch.isfinite(y).all():
        raise CompileError(f"{what}: non-finite output")


def _check_same(
    kernel: nn.Module, module: nn.Module, x: torch.Tensor, mode: str, seed: int
) -> torch.Tensor:
    """Run the reloaded kernel and the eager module alike (same RNG for dropout); compare."""
    for m in (kernel, module):
        m.train(mode == "train")
    outputs = []
    for m in (kernel, module):
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            outputs.append(m(x))
    try:
        torch.testing.assert_close(outputs[0], outputs[1])
    except AssertionError as exc:
        raise CompileError(
            f"the reloaded kernel disagrees with the built module in {mode} mode: {exc}"
        ) from None
    return outputs[0]


def _latency_us(kernel: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    kernel.eval()
    samples = []
    with torch.no_grad():
        for _ in range(3):
            kernel(x)
        for _ in range(LATENCY_RUNS):
            start = time.perf_counter_ns()
            kernel(x)
            samples.append((time.perf_counter_ns() - start) / 1e3)
    samples.sort()

    def pct(q: float) -> float:
        return round(samples[min(len(samples) - 1, math.ceil(q * len(samples)) - 1)], 1)

    return pct(0.50), pct(0.99)


def _validate(
    artifact: bytes, module: nn.Module, sig: Signature, batch_sizes: Sequence[int], seed: int
) -> dict:
    try:
        kernel = load_kernel(artifact)
    except KernelLoadError as exc:
        raise CompileError(f"the saved archive does not reload: {exc}") from exc
    channels = sig.layout == "channels"
    spatials: list[tuple[int, int] | None] = list(SPATIAL_SIZES) if channels else [None]
    gen = torch.Generator().manual_seed(seed)
    notes: list[str] = []

    probe = _example(sig, LATENCY_BATCH, spatials[0], gen)
    y = _check_same(kernel, module, probe, "eval", seed)
    _expect_output(y, probe, sig, "eval mode at init")
    max_abs = float(y.abs().max())
    if sig.graft == "residual" and max_abs != 0.0:
        raise CompileError(
            f"a residual-graft seed must output exactly zero at init, got max |s(h)| = {max_abs:.3g}"
        )
    _expect_output(_check_same(kernel, module, probe, "train", seed), probe, sig, "train mode")

    bn_features = not channels and any(isinstance(m, nn.BatchNorm1d) for m in module.modules())
    for mode in ("train", "eval"):
        kernel.train(mode == "train")
        for batch in batch_sizes:
            if mode == "train" and batch == 1 and bn_features:
                notes.append("batch 1 not run in train mode: batchnorm needs more than one sample")
                continue
            for spatial in spatials:
                x = _example(sig, batch, spatial, gen)
                what = f"{mode} mode, batch {batch}" + (f", spatial {spatial}" if spatial else "")
                try:
                    with torch.no_grad():
                        y = kernel(x)
                except _TORCH_FAILURES as exc:
                    raise CompileError(f"{what}: {type(exc).__name__}: {exc}") from exc
                _expect_output(y, x, sig, what)

    kernel.train()
    x = _example(sig, LATENCY_BATCH, spatials[0], gen)
    y = kernel(x)
    (y.float() * torch.randn(y.shape, generator=gen)).sum().backward()
    for name, p in kernel.named_parameters():
        if p.grad is None:
            raise CompileError(f"backward does not reach parameter {name!r}")
        if not torch.isfinite(p.grad).all():
            raise CompileError(f"non-finite gradient for parameter {name!r}")
    p50, p99 = _latency_us(kernel, x)
    kernel.train()
    return {
        "batch_sizes": list(batch_sizes),
        "spatial_sizes": [list(s) for s in SPATIAL_SIZES] if channels else None,
        "output_max_abs_at_init": max_abs,
        "grad_check": "ok",
        "train_eval_check": "ok",
        "latency_us_p50": p50,
        "latency_us_p99": p99,
        "latency_batch": LATENCY_BATCH,
        "param_count": sum(p.numel() for p in kernel.parameters()),
        "torch_version": torch.__version__,
        "compiler_version": COMPILER_VERSION,
        "signature": sig.to_dict(),
        "notes": notes,
    }


def compile_kernel(
    ir: dict,
    signature: Signature | dict,
    *,
    batch_sizes: Sequence[int] = (1, 3, 16),
    seed: int = 0,
) -> CompiledKernel:
    """Build, export, save, reload and validate; `CompileError` names whatever failed.

    The report holds ``batch_sizes``, ``spatial_sizes`` (channels) or None,
    ``output_max_abs_at_init`` (exactly 0 for residual grafts), ``grad_check``,
    ``train_eval_check`` (reloaded == eager module in both modes), ``latency_us_p50`` and
    ``latency_us_p99`` (eval, no grad, batch ``latency_batch``, 100 runs), ``param_count``,
    ``torch_version``, ``compiler_version``, ``signature`` and ``notes`` (checks skipped).
    """
    started = time.perf_counter()
    try:
        sig = parse_signature(signature)
        expected_params = param_count(ir, sig)
        module = build_module(ir, sig, seed=seed).to(TORCH_DTYPES[sig.dtype])
    except IRError as exc:
        raise CompileError(str(exc)) from exc
    if not batch_sizes or any(type(b) is not int or b < 1 for b in batch_sizes):
        raise CompileError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
    try:
        artifact = _export(module, sig)
        report = _validate(artifact, module, sig, batch_sizes, seed)
    except _TORCH_FAILURES as exc:
        raise CompileError(f"compiling failed: {type(exc).__name__}: {exc}") from exc
    if report["param_count"] != expected_params:
        raise CompileError(
            f"built {report['param_count']} parameters but the IR resolves to {expected_params}; "
            "this is a compiler bug, please report it"
        )
    seconds = time.perf_counter() - started
    logger.info(
        "kernel compiled", extra={"blueprint": ir.get("name"), "seconds": round(seconds, 3)}
    )
    return CompiledKernel(
        artifact=artifact,
        sha256=hashlib.sha256(artifact).hexdigest(),
        size_bytes=len(artifact),
        param_count=report["param_count"],
        report=report,
        compile_seconds=seconds,
    )
