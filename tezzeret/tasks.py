"""Celery interface of the compiler: takes a primary key, calls one service, owns retries."""

from __future__ import annotations

import logging

from celery import current_app, shared_task, signals
from celery.exceptions import SoftTimeLimitExceeded

from tezzeret import warmup
from tezzeret.services import kernel_compile, kernel_compile_timed_out

logger = logging.getLogger(__name__)

# Deterministic failures (the compiler refusing the IR) reject the kernel inside
# kernel_compile; whatever else escapes it may pass (storage, database, CPython 3.11's AST
# race between threads), so it is retried, and the claim stops at MAX_COMPILE_ATTEMPTS.
RETRIED_ERRORS = (Exception,)


@shared_task(
    name="tezzeret.compile_kernel",
    queue="compile",
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=RETRIED_ERRORS,
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=5,
    soft_time_limit=120,
    time_limit=180,
)
def compile_kernel_task(kernel_id: str) -> str | None:
    warmup.wait()  # a warm-up still running in this process: export after it, not beside it
    try:
        kernel = kernel_compile(kernel_id=kernel_id)
    except SoftTimeLimitExceeded:
        kernel = kernel_compile_timed_out(
            kernel_id=kernel_id, limit_s=compile_kernel_task.soft_time_limit
        )
    return None if kernel is None else kernel.status


# --- warm-up: a new worker process exports once before its first real compile ----------
# (tezzeret.warmup). Which signal reaches the process that runs the tasks depends on the pool:
# - prefork (`celery worker`'s default): `worker_process_init`, in each pool child after the
#   fork; the parent, which only sends `worker_ready`, never compiles and is not warmed.
# - solo (`-P solo`, and the embedded default's worker threads): `worker_process_init` in the
#   worker's own process, when the pool is created, before it consumes.
# - threads (`-P threads`): no `worker_process_init`; `worker_ready`, in the worker's process.
# Both handlers only start a background thread (a prefork child must report in within 4 s)
# and `warmup.start` runs once per process, so solo's two signals warm it once.


def _consumes_compile(app) -> bool:
    try:
        return compile_kernel_task.queue in app.amqp.queues.consume_from
    except Exception:  # noqa: BLE001 - a hook must never stop a worker from starting
        logger.warning(
            "could not tell whether this worker consumes the compile queue", exc_info=True
        )
        return False


@signals.worker_process_init.connect(dispatch_uid="tezzeret.warmup.worker_process_init")
def warm_up_pool_process(sender=None, **_kwargs) -> None:
    if _consumes_compile(current_app):
        warmup.start(reason=f"worker_process_init {sender}")


@signals.worker_ready.connect(dispatch_uid="tezzeret.warmup.worker_ready")
def warm_up_ready_worker(sender=None, **_kwargs) -> None:
    from celery.concurrency.prefork import TaskPool as PreforkPool

    if isinstance(getattr(sender, "pool", None), PreforkPool):
        return  # the pool's children run the tasks and warm themselves
    app = getattr(sender, "app", None) or current_app
    if _consumes_compile(app):
        warmup.start(reason=f"worker_ready {getattr(sender, 'hostname', sender)}")
