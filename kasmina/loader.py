"""Fetch → verify → deserialise kernels, synchronously or on one background thread.

Order of lookups for `KernelLoader.fetch`: the memory cache (a copy of the cached template),
the disk cache (no registry call at all), then the registry: metadata (must be validated),
bytes from the disk cache by sha256 or downloaded, sha256 checked **before** deserialising.

A circuit breaker per kernel id counts consecutive failures (a down registry included);
after ``max_failures`` it opens and fetches fail fast with `CircuitOpen` until a backoff
(``backoff_s · 2^(n-1)``, capped at ``max_backoff_s``) has passed; then one attempt is let
through, and a success closes it. A kernel that is still compiling is not a failure.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import queue
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

from torch import nn

from kasmina._artifact import KernelLoadError, load_kernel
from kasmina.cache import CacheEntry, KernelCache
from kasmina.client import EsperClient
from kasmina.errors import (
    ChecksumMismatch,
    CircuitOpen,
    KasminaError,
    KernelFetchError,
    KernelLoadFailed,
    KernelNotCached,
    KernelNotReady,
    KernelRejected,
)

__all__ = [
    "ChecksumMismatch",
    "CircuitOpen",
    "KernelFetchError",
    "KernelLoadFailed",
    "KernelLoader",
    "KernelNotCached",
    "KernelNotReady",
    "KernelRejected",
    "LoadedKernel",
    "instantiate",
]

logger = logging.getLogger(__name__)

# Forward hooks and flags that `copy.deepcopy` of a GraphModule drops (torch 2.13 copies only
# the state-dict hooks); the loader's input guard lives in `_forward_pre_hooks`.
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
_PLAIN_ATTRS = ("validate_inputs",)
# torch's deepcopy of a graph's pytree specs trips typing_extensions' LeafSpec deprecation;
# `catch_warnings` swaps global state, so our own copies take turns.
_COPY_LOCK = threading.Lock()


@dataclass
class LoadedKernel:
    kernel_id: str
    sha256: str
    signature: dict
    module: nn.Module
    param_count: int


def instantiate(template: nn.Module) -> nn.Module:
    """A fresh, independent copy of a loaded kernel: own parameters, same hooks, same mode."""
    with _COPY_LOCK, warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*LeafSpec.* is deprecated", category=FutureWarning
        )
        module = copy.deepcopy(template)
    for name in _HOOK_DICTS:
        hooks = template.__dict__.get(name)
        if hooks and not module.__dict__.get(name):
            setattr(module, name, OrderedDict(hooks))
    for name in _PLAIN_ATTRS:
        if name in template.__dict__ and name not in module.__dict__:
            module.__dict__[name] = template.__dict__[name]
    return module.train(template.training)


@dataclass
class _Breaker:
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""


def _serve(ref: weakref.ref[KernelLoader], jobs: queue.SimpleQueue) -> None:
    """A loader's background thread: fetch queued kernels until closed or collected."""
    while True:
        item = jobs.get()
        loader = ref()
        if item is None or loader is None:
            return
        loader._serve_one(*item)
        del loader


class KernelLoader:
    """Loads kernels through ``cache`` and ``client``; one daemon thread serves `submit`.

    ``client=None`` is an offline loader: only the memory and disk caches are used.
    """

    def __init__(
        self,
        client: EsperClient | None,
        cache: KernelCache | None = None,
        *,
        max_failures: int = 3,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        if client is None and cache is None:
            raise ValueError(
                "KernelLoader needs a client, a cache, or both: pass EsperClient() to download "
                "or KernelCache(disk_dir=...) to load offline"
            )
        if max_failures < 1 or backoff_s < 0 or max_backoff_s < backoff_s:
            raise ValueError(
                "need max_failures >= 1 and 0 <= backoff_s <= max_backoff_s; got "
                f"{max_failures}, {backoff_s}, {max_backoff_s}"
            )
        self.client = client
        self.cache = cache if cache is not None else KernelCache()
        self.max_failures = int(max_failures)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self._breakers: dict[str, _Breaker] = {}
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._inflight: dict[str, Future] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    def __enter__(self) -> KernelLoader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- circuit breaker ------------------------------------------------------------------

    def failures(self, kernel_id: str) -> int:
        """Consecutive failures of this kernel since its last success."""
        breaker = self._breakers.get(str(kernel_id))
        return breaker.failures if breaker else 0

    def next_retry_at(self, kernel_id: str) -> float:
        """`time.monotonic()` value before which retrying this kernel is pointless (0.0: any time)."""
        breaker = self._breakers.get(str(kernel_id))
        return breaker.retry_at if breaker else 0.0

    def is_open(self, kernel_id: str) -> bool:
        """Whether a fetch now would fail fast with `CircuitOpen`."""
        breaker = self._breakers.get(str(kernel_id))
        return (
            breaker is not None
            and breaker.failures >= self.max_failures
            and time.monotonic() < breaker.retry_at
        )

    def reset(self, kernel_id: str) -> None:
        """Forget the failures of this kernel (e.g. after an operator fixed the registry)."""
        with self._lock:
            self._breakers.pop(str(kernel_id), None)

    def _delay(self, failures: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))

    def _admit(self, kernel_id: str) -> None:
        """Raise `CircuitOpen` while open; past the backoff, let this one attempt through."""
        with self._lock:
            breaker = self._breakers.get(kernel_id)
            if breaker is None or breaker.failures < self.max_failures:
                return
            now = time.monotonic()
            if now < breaker.retry_at:
                raise CircuitOpen(
                    kernel_id, breaker.failures, breaker.retry_at - now, breaker.last_error
                )
            # Half-open: concurrent attempts fail fast until this probe has an outcome.
            breaker.retry_at = now + self._delay(breaker.failures)

    def _record_failure(self, kernel_id: str, exc: BaseException, *, final: bool) -> None:
        with self._lock:
            breaker = self._breakers.setdefault(kernel_id, _Breaker())
            breaker.failures = (
                max(breaker.failures + 1, self.max_failures) if final else breaker.failures + 1
            )
            breaker.retry_at = time.monotonic() + self._delay(breaker.failures)
            breaker.last_error = error = f"{type(exc).__name__}: {exc}"[:500]
            failures = breaker.failures
        logger.warning(
            "kernel %s fetch failed (%d so far): %s",
            kernel_id,
            failures,
            error,
            extra={"kernel_id": kernel_id, "failures": failures, "error": error},
        )

    # --- fetching -------------------------------------------------------------------------

    def fetch(self, kernel_id: str) -> LoadedKernel:
        """A fresh instance of the kernel; raises a `KasminaError` subclass on failure."""
        kernel_id = str(kernel_id)
        self._admit(kernel_id)
        try:
            loaded = self._fetch(kernel_id)
        except KernelNotReady:
            raise
        except Exception as exc:
            # A rejection is permanent: open the breaker at once so nothing retries it.
            self._record_failure(kernel_id, exc, final=isinstance(exc, KernelRejected))
            raise
        if kernel_id in self._breakers:
            self.reset(kernel_id)
        return loaded

    def _fetch(self, kernel_id: str) -> LoadedKernel:
        entry = self.cache.get(kernel_id)
        source = "cache"
        if entry is None:
            entry = self._from_registry(kernel_id)
            source = "registry"
        if entry.template is None:
            started = time.perf_counter()
            actual = hashlib.sha256(entry.artifact).hexdigest()
            if actual != entry.sha256:
                self.cache.discard(kernel_id)  # so the next attempt downloads afresh
                raise ChecksumMismatch(kernel_id, entry.sha256, actual)
            try:
                template = load_kernel(entry.artifact)
            except KernelLoadError as exc:
                raise KernelLoadFailed(kernel_id, str(exc)) from exc
            entry = dataclasses.replace(entry, template=template)
            self.cache.put(entry)
            logger.info(
                "kernel loaded",
                extra={
                    "kernel_id": kernel_id,
                    "source": source,
                    "bytes": len(entry.artifact),
                    "load_ms": round((time.perf_counter() - started) * 1e3, 2),
                },
            )
        module = instantiate(entry.template)
        return LoadedKernel(
            kernel_id=kernel_id,
            sha256=entry.sha256,
            signature=entry.signature,
            module=module,
            param_count=sum(p.numel() for p in module.parameters()),
        )

    def _from_registry(self, kernel_id: str) -> CacheEntry:
        if self.client is None:
            raise KernelNotCached(kernel_id)
        info = self.client.get_kernel(kernel_id)
        if info.status == "rejected":
            raise KernelRejected(kernel_id, info.error)
        if not info.is_ready:
            raise KernelNotReady(kernel_id, info.status)
        artifact = self.cache.get_artifact(info.artifact_sha256)
        if artifact is None:
            artifact = self.client.download_artifact(
                kernel_id, expected_sha256=info.artifact_sha256
            )
        return CacheEntry(kernel_id, info.artifact_sha256, info.signature, artifact)

    # --- background -----------------------------------------------------------------------

    def submit(self, kernel_id: str) -> Future[LoadedKernel]:
        """`fetch` on the loader's background thread; one future per kernel while in flight.

        With the breaker open the returned future has already failed with `CircuitOpen`.
        """
        kernel_id = str(kernel_id)
        with self._lock:
            if self._closed:
                raise KasminaError("this KernelLoader is closed; create a new one")
            future = self._inflight.get(kernel_id)
            if future is not None:
                return future
            future = Future()
            breaker = self._breakers.get(kernel_id)
            now = time.monotonic()
            if breaker and breaker.failures >= self.max_failures and now < breaker.retry_at:
                future.set_exception(
                    CircuitOpen(
                        kernel_id, breaker.failures, breaker.retry_at - now, breaker.last_error
                    )
                )
                return future
            self._inflight[kernel_id] = future
            if self._thread is None:
                # The thread holds the loader weakly (as ThreadPoolExecutor's workers do):
                # a loader dropped without close() is collected, and then its thread ends
                # and lets go of the client and its pooled connections.
                stop = self._queue
                ref = weakref.ref(self, lambda _ref: stop.put(None))
                self._thread = threading.Thread(
                    target=_serve, args=(ref, stop), name="kasmina-loader", daemon=True
                )
                self._thread.start()
        self._queue.put((kernel_id, future))
        return future

    def _serve_one(self, kernel_id: str, future: Future[LoadedKernel]) -> None:
        try:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self.fetch(kernel_id))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
        finally:
            with self._lock:
                if self._inflight.get(kernel_id) is future:
                    del self._inflight[kernel_id]

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the background thread after the fetch in progress; queued ones are cancelled."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._inflight.values())
            thread = self._thread
        for future in pending:
            future.cancel()
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
