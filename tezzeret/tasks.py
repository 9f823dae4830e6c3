"""Celery interface of the compiler: takes a primary key, calls one service, owns retries."""

from __future__ import annotations

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from tezzeret.services import kernel_compile, kernel_compile_timed_out

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
    try:
        kernel = kernel_compile(kernel_id=kernel_id)
    except SoftTimeLimitExceeded:
        kernel = kernel_compile_timed_out(
            kernel_id=kernel_id, limit_s=compile_kernel_task.soft_time_limit
        )
    return None if kernel is None else kernel.status
