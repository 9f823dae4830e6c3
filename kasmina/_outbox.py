"""The Controller's ordered outbox: writes to the server that survive an outage.

Writes (opening a run, outcomes, run metrics) are queued in order and sent on a
background executor. The first write that cannot reach the server stops the drain and
backs off exponentially; the queue is kept, so the records land once the server is back.
A write the server refuses (4xx) is logged and dropped: sending it again cannot help.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

from kasmina.errors import KasminaError, RegistryUnavailable

logger = logging.getLogger(__name__)

RETRY_BASE_S, RETRY_MAX_S = 0.5, 30.0


@dataclass
class Write:
    """One outbox entry; `path` is resolved when it is sent (the run id may come later)."""

    method: str
    path: Callable[[], str | None]
    body: dict
    what: str
    idempotent: bool = True
    on_done: Callable[[dict], None] | None = None


class Outbox:
    """Ordered, retried writes through `client.request`, sent on `executor`'s thread."""

    def __init__(self, client, executor: Executor, give_up: Callable[[], bool] | None = None):
        self.client, self.executor, self.give_up = client, executor, give_up
        self._queue: deque[Write] = deque()
        self._lock = threading.Lock()
        self._drain: Future | None = None
        self._retry_at = 0.0
        self.failures = 0  # consecutive sends that could not reach the server
        self.dropped = 0  # writes refused by the server (4xx) or with no run to go to

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def server_down(self) -> bool:
        """The last send could not reach the server (reset by the next one that does)."""
        return self.failures > 0

    def put(self, write: Write) -> None:
        with self._lock:
            self._queue.append(write)

    def pump(self) -> None:
        """Start a drain on the executor unless one runs, the queue is empty or we back off."""
        if (
            not self._queue
            or (self._drain is not None and not self._drain.done())
            or time.monotonic() < self._retry_at
        ):
            return
        self._drain = self.executor.submit(self._send_all)

    def flush(self, deadline: float) -> bool:
        """Send everything, retrying without the usual backoff wait, until `deadline`
        (a `time.monotonic()` value). Returns whether the queue is empty."""
        self._retry_at = min(self._retry_at, time.monotonic())
        while self._queue and (remaining := deadline - time.monotonic()) > 0:
            if self._drain is None or self._drain.done():
                backoff = self._retry_at - time.monotonic()
                if backoff > 0:
                    time.sleep(min(backoff, remaining))
                    continue
                self._drain = self.executor.submit(self._send_all)
            wait_futures([self._drain], timeout=remaining)
        return not self._queue

    @property
    def in_flight(self) -> Future | None:
        return self._drain

    def _send_all(self) -> None:
        """Send writes in order; stop at the first that cannot reach the server."""
        while True:
            with self._lock:
                if not self._queue:
                    return
                item = self._queue[0]
            path = item.path()
            answer = None
            if path is None:
                self.dropped += 1
                logger.error(
                    "%s dropped: the run was never opened", item.what, extra={"what": item.what}
                )
            else:
                try:
                    answer = self.client.request(
                        item.method,
                        path,
                        item.body,
                        idempotent=item.idempotent,
                        give_up=self.give_up,
                    )
                except RegistryUnavailable as exc:
                    delay = self._backoff()
                    logger.warning(
                        "server unreachable; %s kept, retried in %.1f s: %s",
                        item.what,
                        delay,
                        exc,
                        extra={"what": item.what, "retry_in_s": delay, "error": str(exc)},
                    )
                    return
                except KasminaError as exc:  # a 4xx: sending it again cannot help
                    self.dropped += 1
                    logger.error(
                        "%s refused by the server, dropped: %s",
                        item.what,
                        exc,
                        extra={"what": item.what, "error": str(exc)},
                    )
                except Exception:
                    logger.exception("%s failed unexpectedly", item.what, extra={"what": item.what})
                    self._backoff()
                    return
            with self._lock:
                self._queue.popleft()
            self.failures = 0
            if answer is not None and item.on_done is not None:
                item.on_done(answer)

    def _backoff(self) -> float:
        self.failures += 1
        delay = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (self.failures - 1))
        self._retry_at = time.monotonic() + delay
        return delay
