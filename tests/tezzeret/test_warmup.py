"""A compile worker warms `torch.export` up at start-up: a real export, in the background,
once per process, and a failure is a warning, never a crash."""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from django.conf import settings

import tezzeret.compiler
from tests.support import WorkerProcess, served_mode, wait_until
from tezzeret import tasks, warmup
from tezzeret.catalogue import catalogue_entry


@pytest.fixture
def fresh_state(monkeypatch):
    """This process's warm-up state, replaced for the test (the session's embedded worker
    may have warmed the real one)."""
    state = warmup._State()
    monkeypatch.setattr(warmup, "_state", state)
    return state


@pytest.fixture
def exports(monkeypatch):
    """Every archive the compiler's export step produces, while the test runs."""
    real = tezzeret.compiler._export
    archives: list[bytes] = []

    def recording(module, sig):
        archives.append(real(module, sig))
        return archives[-1]

    monkeypatch.setattr(tezzeret.compiler, "_export", recording)
    return archives


def _failing_export(monkeypatch, message="export is broken today"):
    def broken(module, sig):
        raise RuntimeError(message)

    monkeypatch.setattr(tezzeret.compiler, "_export", broken)


def test_warm_up_exports_a_real_kernel_and_the_next_compile_is_measured(exports, record_property):
    result = warmup.warm_up()

    assert result.ok, result.error
    assert result.blueprint == warmup.WARMUP_BLUEPRINT
    assert len(exports) == 1 and result.artifact_bytes == len(exports[0])
    program = torch.export.load(io.BytesIO(exports[0]))  # a real .pt2 archive of the module
    assert any(node.op == "call_function" for node in program.graph.nodes)
    sig = warmup.WARMUP_SIGNATURE
    torch.testing.assert_close(program.module()(torch.randn(2, sig["in"])), torch.zeros(2, 4))

    # The export after the warm-up, timed (reported, not asserted: no timing thresholds).
    ir = catalogue_entry("residual-mlp-small")["ir"]
    signature = {"graft": "residual", "layout": "features", "in": 64, "out": 64, "dtype": "float32"}
    kernel = tezzeret.compiler.compile_kernel(ir, signature)
    assert len(exports) == 2 and kernel.size_bytes == len(exports[1])
    assert math.isfinite(result.seconds) and result.seconds > 0
    assert math.isfinite(kernel.compile_seconds) and kernel.compile_seconds > 0
    record_property("warmup_seconds", round(result.seconds, 3))
    record_property("compile_after_warmup_seconds", round(kernel.compile_seconds, 3))


def test_a_failing_export_makes_a_warning_not_an_exception(monkeypatch, caplog):
    _failing_export(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="tezzeret.warmup"):
        result = warmup.warm_up()
    assert not result.ok and result.artifact_bytes is None
    assert "export is broken today" in result.error
    [record] = [r for r in caplog.records if r.name == "tezzeret.warmup"]
    assert record.levelno == logging.WARNING and record.exc_info
    assert "export is broken today" in record.error


def test_any_failure_of_the_warm_up_is_caught(monkeypatch):
    monkeypatch.setattr(warmup, "WARMUP_BLUEPRINT", "no-such-blueprint")
    result = warmup.warm_up()
    assert not result.ok and result.error.startswith("KeyError")


def test_start_warms_once_in_a_background_thread_and_a_failure_stays_there(
    fresh_state, monkeypatch
):
    _failing_export(monkeypatch)
    uncaught = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)

    assert warmup.start(reason="test") is True
    assert fresh_state.thread.name == "tezzeret-warmup" and fresh_state.thread.daemon
    assert warmup.start(reason="test again") is False  # once per process
    assert warmup.wait(timeout=120) is True
    fresh_state.thread.join(timeout=10)
    assert uncaught == []
    assert warmup.result() is not None and not warmup.result().ok


def test_start_does_nothing_when_the_setting_is_off(fresh_state, settings):
    settings.ESPER_COMPILE_WARMUP = False
    assert warmup.start(reason="test") is False
    assert fresh_state.thread is None
    assert warmup.wait(timeout=0) is True and warmup.result() is None


def test_wait_returns_at_once_without_a_warm_up_and_waits_for_a_running_one(fresh_state):
    started = time.perf_counter()
    assert warmup.wait() is True  # none started: no waiting at all
    assert time.perf_counter() - started < warmup.WAIT_TIMEOUT_S

    fresh_state.thread = threading.Thread(target=lambda: None)
    assert warmup.wait(timeout=0.01) is False  # still running: gives up after the timeout
    threading.Timer(0.1, fresh_state.done.set).start()
    assert warmup.wait(timeout=30) is True


def test_the_compile_task_waits_for_the_warm_up_before_it_compiles(monkeypatch):
    calls = []
    monkeypatch.setattr(tasks.warmup, "wait", lambda: calls.append("wait"))
    monkeypatch.setattr(tasks, "kernel_compile", lambda kernel_id: calls.append(kernel_id))
    assert tasks.compile_kernel_task.run("kernel-1") is None
    assert calls == ["wait", "kernel-1"]


def _app(*queues):
    return SimpleNamespace(amqp=SimpleNamespace(queues=SimpleNamespace(consume_from=queues)))


@pytest.fixture
def starts(monkeypatch):
    calls = []
    monkeypatch.setattr(tasks.warmup, "start", lambda *, reason: calls.append(reason))
    return calls


def test_a_pool_process_of_a_compile_worker_warms_up(monkeypatch, starts):
    """worker_process_init: each prefork child, or the solo pool's own process."""
    monkeypatch.setattr(tasks, "current_app", _app("compile", "train"))
    tasks.warm_up_pool_process(sender="w1@host")
    monkeypatch.setattr(tasks, "current_app", _app("train"))
    tasks.warm_up_pool_process(sender="w2@host")
    assert starts == ["worker_process_init w1@host"]


def test_a_ready_worker_warms_up_unless_its_pool_forks(starts):
    """worker_ready: the threads pool runs tasks in the worker's process; prefork does not."""
    from celery.concurrency import prefork, thread

    compile_app = _app("compile")
    prefork_pool = prefork.TaskPool.__new__(prefork.TaskPool)
    thread_pool = thread.TaskPool.__new__(thread.TaskPool)
    tasks.warm_up_ready_worker(sender=SimpleNamespace(pool=prefork_pool, app=compile_app))
    tasks.warm_up_ready_worker(sender=SimpleNamespace(pool=thread_pool, app=_app("train")))
    assert starts == []
    tasks.warm_up_ready_worker(
        sender=SimpleNamespace(pool=thread_pool, app=compile_app, hostname="t@host")
    )
    assert starts == ["worker_ready t@host"]


def test_a_hook_that_cannot_read_the_queues_does_not_raise(monkeypatch, starts):
    monkeypatch.setattr(tasks, "current_app", SimpleNamespace())
    tasks.warm_up_pool_process(sender="w@host")
    assert starts == []


@pytest.mark.skipif(not settings.ESPER_COMPILE_WARMUP, reason="ESPER_COMPILE_WARMUP is off")
def test_the_embedded_compile_worker_warmed_this_process(celery_worker):
    if served_mode():
        pytest.skip("the embedded default's worker threads only")
    assert warmup.wait(timeout=120) is True
    result = warmup.result()
    assert result is not None and result.ok, result and result.error


@pytest.mark.served
@pytest.mark.skipif(not settings.ESPER_COMPILE_WARMUP, reason="ESPER_COMPILE_WARMUP is off")
def test_a_celery_compile_worker_process_warms_up_in_its_pool_child(
    transactional_db, artifact_root, tmp_path
):
    worker = WorkerProcess(artifact_root=str(artifact_root), queues="compile", log_dir=tmp_path)
    try:
        wait_until(
            lambda: "compile warm-up done" in worker.log_path.read_text(errors="replace"),
            timeout=120,
            what=f"the warm-up; worker log:\n{worker.log()}",
        )
        log = worker.log_path.read_text(errors="replace")
        assert "reason=worker_process_init" in log and "warm-up failed" not in log
    finally:
        worker.stop()
