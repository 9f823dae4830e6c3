"""The embedded default's worker: real Celery workers running as threads of this process.

With the in-process `memory://` broker only a worker inside the same process can see the
queues, so `manage.py serve` (and the test suite in embedded mode) start one worker thread
per queue here. The task code, acks and routing are the same as in the served mode; time
limits are not enforced (they need the prefork pool's signals).

Once the compile worker is up, the compiler is warmed in a background thread (tiny
kernels compiled through the real pipeline, `tezzeret.warmup`), so the first kernel a client asks
for compiles as fast as later ones while start-up and requests go on (ESPER_COMPILE_WARMUP).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterable

from celery.worker import WorkController

from esper_site.celery import app

logger = logging.getLogger(__name__)

_started: dict[str, tuple[WorkController, threading.Thread]] = {}
_lock = threading.Lock()


def start_worker_threads(
    queues: Iterable[str] = ("compile", "train"), *, timeout: float = 30.0
) -> list[WorkController]:
    """Start (once per queue) a solo-pool worker thread consuming that queue."""
    workers = []
    with _lock:
        for queue in queues:
            if queue in _started and _started[queue][1].is_alive():
                workers.append(_started[queue][0])
                continue
            ready = threading.Event()
            worker = WorkController(
                app=app,
                hostname=f"embedded-{queue}@{socket.gethostname()}",
                pool_cls="solo",
                concurrency=1,
                queues=[queue],
                without_heartbeat=True,
                without_mingle=True,
                without_gossip=True,
                ready_callback=lambda _worker, ready=ready: ready.set(),
                loglevel="INFO",
            )
            thread = threading.Thread(target=worker.start, name=f"celery-{queue}", daemon=True)
            thread.start()
            if not ready.wait(timeout):
                raise RuntimeError(f"embedded worker for queue {queue!r} did not start")
            _started[queue] = (worker, thread)
            workers.append(worker)
            logger.info("embedded worker started", extra={"queue": queue})
            if queue == "compile":
                # The solo pool's worker_process_init has normally started it already
                # (tezzeret.tasks); start() warms a process once.
                from tezzeret import warmup

                warmup.start(reason="embedded worker")
    return workers


def worker_threads() -> dict[str, bool]:
    """{hostname: thread alive} of the worker threads started here (empty in served mode)."""
    with _lock:
        return {worker.hostname: thread.is_alive() for worker, thread in _started.values()}


def stop_worker_threads() -> None:
    with _lock:
        for queue, (worker, thread) in list(_started.items()):
            worker.stop(in_sighandler=False)
            thread.join(timeout=10)
            del _started[queue]
