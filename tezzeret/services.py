"""Tezzeret's Django-facing services: signature checks for urza, and compiling a kernel row."""

from __future__ import annotations

import logging
import time

from tezzeret import ir as ir_mod
from urza import services as urza_services
from urza.models import Kernel

logger = logging.getLogger(__name__)


def signature_validate(*, ir: dict, signature: object) -> dict:
    """Normalised signature, or `IRError` naming the field that does not fit the blueprint."""
    sig = ir_mod.parse_signature(signature)
    ir_mod.check_signature(ir, sig)
    return sig.to_dict()


def param_count(*, ir: dict, signature: object) -> int:
    """Trainable parameters of the kernel `ir` compiles to for `signature` (arithmetic)."""
    return ir_mod.param_count(ir, ir_mod.parse_signature(signature))  # IRError if it does not fit


def kernel_compile(*, kernel_id: str) -> Kernel | None:
    """Claim the kernel, compile it and record the outcome. Deterministic failures reject it.

    Anything else (storage, database, an interpreter error such as CPython 3.11's AST race)
    propagates so the task can retry it; the kernel is handed back to `pending` first, with
    the error noted, and the claim rejects it once its attempts run out.
    """
    from tezzeret.compiler import CompileError, compile_kernel

    kernel = urza_services.kernel_claim(kernel_id=kernel_id)
    if kernel is None:
        logger.info("kernel not claimable; nothing to do", extra={"kernel": kernel_id})
        return None
    started = time.perf_counter()
    try:
        signature = ir_mod.parse_signature(kernel.signature)
        result = compile_kernel(kernel.blueprint.ir, signature)
    except (CompileError, ValueError) as exc:
        urza_services.kernel_mark_rejected(kernel=kernel, error=str(exc))
        logger.warning("kernel rejected", extra={"kernel": kernel_id, "error": str(exc)})
        return kernel
    except Exception as exc:
        error = f"attempt {kernel.attempts} failed: {type(exc).__name__}: {exc}"
        urza_services.kernel_release(kernel=kernel, error=error)
        logger.exception("kernel compile failed; released for a retry", extra={"kernel": kernel_id})
        raise
    try:
        urza_services.kernel_mark_validated(
            kernel=kernel,
            artifact=result.artifact,
            report=result.report,
            param_count=result.param_count,
            compile_seconds=result.compile_seconds,
        )
    except Exception:
        urza_services.kernel_release(kernel=kernel)
        raise
    logger.info(
        "kernel validated",
        extra={"kernel": kernel_id, "seconds": round(time.perf_counter() - started, 3)},
    )
    return kernel


def kernel_compile_timed_out(*, kernel_id: str, limit_s: float) -> Kernel | None:
    kernel = Kernel.objects.filter(pk=kernel_id).first()
    if kernel is not None:
        urza_services.kernel_mark_rejected(
            kernel=kernel, error=f"compile exceeded the {limit_s:.0f} s time limit"
        )
    return kernel
