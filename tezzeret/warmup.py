"""Warm a compile worker's process up before its first real compile.

A process's first ``torch.export`` pays once for loading and initialising dynamo, the export
tracer and the serialiser: on a 2-core machine the first compile of a small kernel took
0.7 s against 0.1 s for the next one (more on a cold disk; a user trial waited 387 training
steps for a fresh server's first kernel). `warm_up` runs the
real pipeline, `tezzeret.compiler.compile_kernel` (resolve, build, ``torch.export``, save,
reload, validate), on a tiny kernel of a catalogue blueprint and throws the result away; it
touches neither the database nor the artifact storage.

`start` runs it once per process in a background thread, so neither Django's start-up nor
a worker's start-up (billiard gives a prefork child 4 s to come up) waits for it; `wait` is
called by the compile task, so a job that arrives during the warm-up waits for it instead of
exporting beside it in a second thread. The hooks that call `start` live with the Celery
task (`tezzeret.tasks`) and in `esper_site.embedded`; ``ESPER_COMPILE_WARMUP=0`` turns them
off. A failed warm-up logs a warning and changes nothing else: the first compile is then
merely slow.

Nothing here imports torch until the warm-up runs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# The smallest kernel of a catalogue blueprint: what a first export costs is the process's,
# not the kernel's, and a features kernel warms the channels (conv, dynamic H and W) ones
# as well (measured: the first conv3x3-block compile after it is as fast as a second one).
WARMUP_BLUEPRINT = "residual-mlp-small"
WARMUP_SIGNATURE = {
    "graft": "residual",
    "layout": "features",
    "in": 4,
    "out": 4,
    "dtype": "float32",
}
# How long a compile task waits for a warm-up still running in its process before it
# compiles anyway (the task's soft time limit is 120 s).
WAIT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class WarmupResult:
    ok: bool
    seconds: float
    blueprint: str
    # size of the .pt2 archive it exported, saved and reloaded; None when it failed
    artifact_bytes: int | None = None
    error: str | None = None


def warm_up() -> WarmupResult:
    """Compile `WARMUP_BLUEPRINT` for `WARMUP_SIGNATURE` through the real pipeline; never
    raises. Logs the duration at INFO, or a warning (with the traceback) when it fails."""
    started = time.perf_counter()
    try:
        from tezzeret import compiler
        from tezzeret.catalogue import catalogue_entry

        ir = catalogue_entry(WARMUP_BLUEPRINT)["ir"]
        kernel = compiler.compile_kernel(ir, WARMUP_SIGNATURE)
    except Exception as exc:  # noqa: BLE001 - a warm-up must never take a worker down
        seconds = time.perf_counter() - started
        error = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "compile warm-up failed; the first compile will be slow",
            extra={"seconds": round(seconds, 3), "error": error},
            exc_info=True,
        )
        return WarmupResult(ok=False, seconds=seconds, blueprint=WARMUP_BLUEPRINT, error=error)
    seconds = time.perf_counter() - started
    logger.info(
        "compile warm-up done",
        extra={"seconds": round(seconds, 3), "blueprint": WARMUP_BLUEPRINT},
    )
    return WarmupResult(
        ok=True, seconds=seconds, blueprint=WARMUP_BLUEPRINT, artifact_bytes=kernel.size_bytes
    )


class _State:
    """This process's warm-up; reset in a forked child, which inherits no thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.done = threading.Event()
        self.result: WarmupResult | None = None


_state = _State()


def _reset_after_fork() -> None:
    global _state
    _state = _State()


os.register_at_fork(after_in_child=_reset_after_fork)


def enabled() -> bool:
    from django.conf import settings

    return bool(getattr(settings, "ESPER_COMPILE_WARMUP", True))


def start(*, reason: str) -> bool:
    """Start `warm_up` in a daemon thread unless this process already did, or the setting
    ``ESPER_COMPILE_WARMUP`` is off. Returns whether this call started it; never raises."""
    try:
        if not enabled():
            logger.info("compile warm-up off (ESPER_COMPILE_WARMUP=0)", extra={"reason": reason})
            return False
        state = _state
        with state.lock:
            if state.thread is not None:
                return False

            def run() -> None:
                try:
                    state.result = warm_up()
                finally:
                    state.done.set()

            thread = threading.Thread(target=run, name="tezzeret-warmup", daemon=True)
            thread.start()
            state.thread = thread
    except Exception:  # noqa: BLE001 - nor may starting it take the worker down
        logger.warning("compile warm-up not started", extra={"reason": reason}, exc_info=True)
        return False
    logger.info("compile warm-up started", extra={"reason": reason})
    return True


def wait(timeout: float = WAIT_TIMEOUT_S) -> bool:
    """Block while a warm-up started in this process is still running, at most `timeout`
    seconds. True when none is running (or none was started), False on timeout."""
    state = _state
    if state.thread is None or state.done.is_set():
        return True
    started = time.perf_counter()
    finished = state.done.wait(timeout)
    waited = round(time.perf_counter() - started, 3)
    if finished:
        logger.info("compile waited for the warm-up", extra={"seconds": waited})
    else:
        logger.warning("compile warm-up still running; compiling anyway", extra={"seconds": waited})
    return finished


def result() -> WarmupResult | None:
    """The result of this process's warm-up, or None if none has finished."""
    return _state.result
