"""Every error kasmina raises derives from `KasminaError`; each message says what to do next.

```
KasminaError
├── EsperError                talking to the registry failed
│   ├── ApiError              the registry answered 4xx (its JSON error is attached)
│   ├── RegistryUnavailable   unreachable, timing out or answering 5xx after the retries
│   └── WaitTimeout           a kernel did not finish compiling in time (also a TimeoutError)
└── KernelFetchError          a kernel could not be fetched, verified or loaded
    ├── KernelNotReady        still pending/compiling (or retired): poll again later
    ├── KernelRejected        the compiler refused it for good
    ├── ChecksumMismatch      bytes differ from the published sha256; refused unread
    ├── KernelLoadFailed      verified bytes that the runtime cannot deserialise
    ├── KernelNotCached       offline loader (no client) and nothing cached
    └── CircuitOpen           too many consecutive failures; retry after a backoff
```
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "ChecksumMismatch",
    "CircuitOpen",
    "EsperError",
    "KasminaError",
    "KernelFetchError",
    "KernelLoadFailed",
    "KernelNotCached",
    "KernelNotReady",
    "KernelRejected",
    "RegistryUnavailable",
    "WaitTimeout",
]


class KasminaError(Exception):
    """Base of every error the kasmina runtime raises."""


class EsperError(KasminaError):
    """Talking to the Esper registry over HTTP failed."""


class ApiError(EsperError):
    """The registry answered with a 4xx and its JSON error ``{"error": {code, message, detail}}``.

    4xx answers are never retried: the request itself must change.
    """

    def __init__(self, status: int, code: str, message: str, detail: Any = None, *, url: str = ""):
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail if detail is not None else {}
        self.url = url
        where = f" from {url}" if url else ""
        super().__init__(f"HTTP {status} {code}{where}: {message}")


class RegistryUnavailable(EsperError):
    """The registry could not be reached, timed out, or answered 5xx on every attempt."""

    def __init__(self, url: str, attempts: int, reason: str, *, status: int | None = None):
        self.url = url
        self.attempts = attempts
        self.reason = reason
        self.status = status
        super().__init__(
            f"registry unavailable at {url} after {attempts} attempt(s): {reason}. "
            "Check that the server is up (GET /healthz) and ESPER_URL points to it; "
            "kernels already in the disk cache still load."
        )


class WaitTimeout(EsperError, TimeoutError):
    """`EsperClient.wait_for_kernel` gave up before the kernel was validated or rejected."""

    def __init__(self, kernel_id: str, status: str, timeout: float):
        self.kernel_id = kernel_id
        self.status = status
        self.timeout = timeout
        super().__init__(
            f"kernel {kernel_id} is still {status} after {timeout:g} s; is a compile worker "
            "running (`celery -A esper_site worker -Q compile`)? GET /healthz lists workers"
        )


class KernelFetchError(KasminaError):
    """A kernel could not be fetched, verified or loaded."""

    def __init__(self, kernel_id: str, message: str):
        self.kernel_id = kernel_id
        super().__init__(message)


class KernelNotReady(KernelFetchError):
    """The kernel exists but is not validated (yet): poll its status, then fetch again."""

    def __init__(self, kernel_id: str, status: str):
        self.status = status
        if status == "retired":
            hint = "it was retired; request a kernel again (POST /api/v1/kernels/)"
        else:
            hint = "it is still being compiled; poll GET /api/v1/kernels/{id}/ and fetch once validated"
        super().__init__(kernel_id, f"kernel {kernel_id} is {status}, not validated: {hint}")


class KernelRejected(KernelFetchError):
    """The compiler rejected the kernel; it will never load. Pick another blueprint."""

    def __init__(self, kernel_id: str, error: str):
        self.error = error
        super().__init__(
            kernel_id,
            f"kernel {kernel_id} was rejected by the compiler ({error or 'no reason given'}); "
            "it will never load: cull the seed or choose another blueprint",
        )


class ChecksumMismatch(KernelFetchError):
    """Artifact bytes whose sha256 differs from the published one; refused before deserialising."""

    def __init__(self, kernel_id: str, expected: str, actual: str, *, where: str = "artifact"):
        self.expected = expected
        self.actual = actual
        super().__init__(
            kernel_id,
            f"{where} of kernel {kernel_id} has sha256 {actual}, expected {expected}; refused "
            "before deserialising. Fetch again (a cached copy is dropped); if it persists the "
            "registry's stored artifact is corrupt: retire the kernel and request it again",
        )


class KernelLoadFailed(KernelFetchError):
    """Verified bytes the runtime could not deserialise (e.g. a torch version mismatch)."""

    def __init__(self, kernel_id: str, reason: str):
        self.reason = reason
        super().__init__(
            kernel_id,
            f"kernel {kernel_id} could not be loaded: {reason}. Kernels are compiled for the "
            "server's torch version; request it again from a registry running this torch",
        )


class KernelNotCached(KernelFetchError):
    """An offline loader (no client) was asked for a kernel it has not cached."""

    def __init__(self, kernel_id: str):
        super().__init__(
            kernel_id,
            f"kernel {kernel_id} is neither in the memory nor the disk cache and this loader "
            "has no client; pass an EsperClient (ESPER_URL/ESPER_TOKEN) or a KernelCache whose "
            "disk_dir holds it",
        )


class CircuitOpen(KernelFetchError):
    """The kernel failed `failures` times in a row; no request is made before `retry_at`."""

    def __init__(self, kernel_id: str, failures: int, retry_in: float, last_error: str):
        self.failures = failures
        self.retry_in = retry_in
        self.last_error = last_error
        super().__init__(
            kernel_id,
            f"circuit open for kernel {kernel_id} after {failures} consecutive failures "
            f"(last: {last_error}); retry in {max(retry_in, 0.0):.1f} s or cull the seed",
        )
