"""A compile that fails in a way that may pass (not a refusal) is retried, never stranded."""

import threading

import pytest

from tezzeret import _expr, services, tasks
from urza import services as urza_services
from urza.models import Blueprint, Kernel

pytestmark = pytest.mark.django_db

SIGNATURE = {"graft": "residual", "layout": "features", "in": 24, "out": 24, "dtype": "float32"}


def _kernel(catalogue) -> Kernel:
    blueprint = Blueprint.objects.get(name="residual-mlp-small", version=1)
    kernel, _ = urza_services.kernel_request(blueprint=blueprint, signature=SIGNATURE)
    return kernel


def _fails_once(monkeypatch, exc):
    """The compiler raises `exc` once, as CPython 3.11's AST race does, then works."""
    import tezzeret.compiler

    real = tezzeret.compiler.compile_kernel
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(tezzeret.compiler, "compile_kernel", flaky)


def test_an_unexpected_error_hands_the_kernel_back_and_the_next_attempt_validates_it(
    catalogue, monkeypatch
):
    kernel = _kernel(catalogue)
    _fails_once(monkeypatch, SystemError("AST constructor recursion depth mismatch"))
    with pytest.raises(SystemError):
        services.kernel_compile(kernel_id=str(kernel.id))
    kernel.refresh_from_db()
    assert kernel.status == "pending" and "SystemError" in kernel.error
    assert services.kernel_compile(kernel_id=str(kernel.id)).status == "validated"
    kernel.refresh_from_db()
    assert kernel.attempts == 2


def test_the_task_retries_whatever_escapes_the_service():
    assert tasks.compile_kernel_task.autoretry_for == (Exception,)


def test_a_kernel_that_keeps_failing_is_rejected_with_the_last_error(catalogue, monkeypatch):
    import tezzeret.compiler

    kernel = _kernel(catalogue)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tezzeret.compiler, "compile_kernel", broken)
    for _ in range(urza_services.MAX_COMPILE_ATTEMPTS):
        with pytest.raises(RuntimeError):
            services.kernel_compile(kernel_id=str(kernel.id))
    assert services.kernel_compile(kernel_id=str(kernel.id)) is None
    kernel.refresh_from_db()
    assert kernel.status == "rejected"
    assert "gave up after 3 attempts" in kernel.error and "disk on fire" in kernel.error


def test_expressions_parse_once_and_threads_parsing_together_all_succeed():
    _expr._parse.cache_clear()
    texts = [f"(D + {i}) // 4" for i in range(200)]
    errors = []

    def work():
        try:
            for text in texts:
                _expr.parse_expr(text, "params.r", frozenset({"D"}))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert _expr._parse.cache_info().currsize == len(texts)
