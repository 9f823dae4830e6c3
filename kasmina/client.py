"""HTTP client for the Esper registry (Urza's REST API): typed results, retries, verified downloads.

The runtime talks to the server only through this module, over HTTP. Connection errors,
timeouts and 5xx answers are retried with exponential backoff; 4xx answers never are
(`ApiError` carries the server's JSON error). A POST that is not idempotent is retried only
when the request provably never reached the server (the connection was refused).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
import urllib3

from kasmina.errors import (
    ApiError,
    ChecksumMismatch,
    EsperError,
    RegistryUnavailable,
    WaitTimeout,
)

__all__ = [
    "ApiError",
    "BlueprintInfo",
    "ChecksumMismatch",
    "EsperClient",
    "EsperError",
    "KernelInfo",
    "RegistryUnavailable",
    "WaitTimeout",
]

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1/"
MAX_ARTIFACT_BYTES = 128 * 2**20  # the loader refuses larger archives anyway
BLUEPRINT_FILTERS = frozenset({"tag", "name", "source", "status"})
FINAL_STATUSES = frozenset({"validated", "rejected", "retired"})
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def _user_agent() -> str:
    try:
        from importlib.metadata import version

        ours = version("esper")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        ours = "0"
    return f"kasmina/{ours} (esper runtime) python-requests/{requests.__version__}"


@dataclass(frozen=True, slots=True)
class BlueprintInfo:
    id: str
    name: str
    version: int
    ir: dict
    ir_sha256: str
    tags: tuple[str, ...]
    source: str
    status: str
    description: str = ""

    @classmethod
    def from_json(cls, body: dict) -> BlueprintInfo:
        return cls(
            id=str(body["id"]),
            name=body["name"],
            version=int(body["version"]),
            ir=body["ir"],
            ir_sha256=body["ir_sha256"],
            tags=tuple(body.get("tags") or ()),
            source=body["source"],
            status=body["status"],
            description=body.get("description") or "",
        )


@dataclass(frozen=True, slots=True)
class KernelInfo:
    id: str
    blueprint: str
    signature: dict
    status: str
    artifact_sha256: str
    size_bytes: int | None
    param_count: int | None
    validation: dict
    error: str
    attempts: int

    @property
    def is_ready(self) -> bool:
        """Validated: its artifact can be downloaded and loaded."""
        return self.status == "validated"

    @property
    def is_final(self) -> bool:
        """Validated, rejected or retired: polling will not change it."""
        return self.status in FINAL_STATUSES

    @classmethod
    def from_json(cls, body: dict) -> KernelInfo:
        return cls(
            id=str(body["id"]),
            blueprint=str(body["blueprint"]),
            signature=body["signature"],
            status=body["status"],
            artifact_sha256=body.get("artifact_sha256") or "",
            size_bytes=body.get("size_bytes"),
            param_count=body.get("param_count"),
            validation=body.get("validation") or {},
            error=body.get("error") or "",
            attempts=int(body.get("attempts") or 0),
        )


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(self, reason: str, *, status: int | None = None, sent: bool = True):
        super().__init__(reason)
        self.reason, self.status, self.sent = reason, status, sent


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the request cannot have reached the server (connect refused or timed out)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if not isinstance(exc, requests.ConnectionError) or not exc.args:
        return False
    reason = getattr(exc.args[0], "reason", exc.args[0])
    # NewConnectionError (refused, unresolvable) subclasses ConnectTimeoutError in urllib3 2.
    return isinstance(reason, urllib3.exceptions.ConnectTimeoutError)


class EsperClient:
    """Client for the registry at ``base_url`` (default ``$ESPER_URL``) with token auth.

    Thread-safe: each thread gets its own `requests.Session` (the loader downloads on a
    background thread while the training loop polls).
    """

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.25,
    ) -> None:
        base_url = base_url or os.environ.get("ESPER_URL")
        token = token or os.environ.get("ESPER_TOKEN")
        if not base_url:
            raise ValueError(
                "no registry URL: pass EsperClient(base_url='http://host:8000') or set ESPER_URL"
            )
        if not token:
            raise ValueError(
                "no API token: pass EsperClient(token=...) or set ESPER_TOKEN "
                "(create one with `python manage.py esper_token USER`)"
            )
        if retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError(
                f"need retries >= 0, timeout > 0 and backoff >= 0; got "
                f"retries={retries}, timeout={timeout}, backoff={backoff}"
            )
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"base_url must be an http(s) URL like http://host:8000, not {base_url!r}"
            )
        root = base_url.rstrip("/")
        if root.endswith(API_PREFIX.rstrip("/")):
            root = root[: -len(API_PREFIX.rstrip("/"))]
        self.base_url = root
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self._headers = {
            "Authorization": f"Token {token}",
            "User-Agent": _user_agent(),
            "Accept": "application/json",
        }
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EsperClient({self.base_url!r}, retries={self.retries}, timeout={self.timeout})"

    def __enter__(self) -> EsperClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def session(self) -> requests.Session:
        """This thread's session (created on first use)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self._headers)
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self._local = threading.local()

    def url(self, path: str) -> str:
        """Absolute URL: ``"kernels/"`` is under ``/api/v1/``; ``"/healthz"`` is from the root."""
        if path.startswith(("http://", "https://")):
            return path
        if path.startswith("/"):
            return self.base_url + path
        return self.base_url + API_PREFIX + path

    # --- transport ------------------------------------------------------------------------

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict | None = None,
        idempotent: bool | None = None,
        accept: tuple[int, ...] = (),
        stream: bool = False,
        give_up: Callable[[], bool] | None = None,
    ) -> requests.Response:
        method = method.upper()
        url = self.url(path)
        if idempotent is None:
            idempotent = method in _IDEMPOTENT_METHODS
        attempts = self.retries + 1
        last: _Retryable | None = None
        for attempt in range(attempts):
            if give_up is not None and give_up():
                reason = last.reason if last is not None else "not sent"
                raise RegistryUnavailable(url, attempt, f"{reason}; the caller gave up")
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                logger.info(
                    "registry request retried",
                    extra={"url": url, "attempt": attempt + 1, "delay_s": delay, "reason": last},
                )
                time.sleep(delay)
            try:
                return self._attempt(method, url, json, params, accept, stream)
            except _Retryable as exc:
                last = exc
                if exc.sent and not idempotent:
                    attempts = attempt + 1
                    break
        assert last is not None
        raise RegistryUnavailable(url, attempts, last.reason, status=last.status)

    def _attempt(
        self,
        method: str,
        url: str,
        json: Any,
        params: dict | None,
        accept: tuple[int, ...],
        stream: bool,
    ) -> requests.Response:
        try:
            response = self.session.request(
                method, url, json=json, params=params, timeout=self.timeout, stream=stream
            )
        except requests.RequestException as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}", sent=not _never_sent(exc)) from exc
        status = response.status_code
        if status in accept or 200 <= status < 300:
            return response
        if status >= 500:
            reason = f"HTTP {status}: {_error_fields(response)[1]}"
            response.close()
            raise _Retryable(reason, status=status)
        code, message, detail = _error_fields(response)
        response.close()
        raise ApiError(status, code, message, detail, url=url)

    def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        *,
        params: dict | None = None,
        idempotent: bool | None = None,
        give_up: Callable[[], bool] | None = None,
    ) -> dict:
        """Call the API and return its JSON body (``{}`` for an empty answer).

        ``path`` is relative to ``/api/v1/`` (``"runs/"``) or absolute from the server root
        (``"/healthz"``). GET/PUT/DELETE are retried on connection errors, timeouts and 5xx;
        POST/PATCH only when the connection was refused, unless ``idempotent=True``. When
        ``give_up()`` turns true, no further attempt starts (`RegistryUnavailable`).
        """
        response = self._send(
            method, path, json=json, params=params, idempotent=idempotent, give_up=give_up
        )
        return _json_body(response)

    # --- registry -------------------------------------------------------------------------

    def healthz(self) -> dict:
        """The server's health report; a 503 is a report too (``ok`` is False), not an error."""
        return _json_body(self._send("GET", "/healthz", accept=(503,)))

    def list_blueprints(self, *, page_size: int = 100, **filters: Any) -> list[BlueprintInfo]:
        """All blueprints matching ``filters`` (tag, name, source, status), every page."""
        unknown = set(filters) - BLUEPRINT_FILTERS
        if unknown:
            raise TypeError(
                f"unknown blueprint filter(s) {sorted(unknown)}; use {sorted(BLUEPRINT_FILTERS)}"
            )
        params: dict[str, Any] = {**filters, "limit": page_size, "offset": 0}
        found: list[BlueprintInfo] = []
        while True:
            body = self.request("GET", "blueprints/", params=params)
            found.extend(BlueprintInfo.from_json(item) for item in body["results"])
            if not body.get("next"):
                return found
            # Follow the next page's query, not its host: behind a proxy it may be internal.
            query = parse_qs(urlsplit(body["next"]).query)
            params = {key: values[-1] for key, values in query.items()}

    def get_blueprint(self, blueprint_id: str) -> BlueprintInfo:
        return BlueprintInfo.from_json(self.request("GET", f"blueprints/{blueprint_id}/"))

    def create_blueprint(
        self,
        name: str,
        version: int,
        ir: dict,
        description: str = "",
        tags: tuple[str, ...] | list[str] = (),
    ) -> BlueprintInfo:
        body = {
            "name": name,
            "version": version,
            "ir": ir,
            "description": description,
            "tags": list(tags),
        }
        return BlueprintInfo.from_json(self.request("POST", "blueprints/", body))

    def request_kernel(self, blueprint_id: str, signature: dict) -> KernelInfo:
        """Get or create the kernel for (blueprint, signature); a new one is queued to compile."""
        body = {"blueprint": str(blueprint_id), "signature": signature}
        # Get-or-create by cache key on the server, so a repeated POST is harmless.
        return KernelInfo.from_json(self.request("POST", "kernels/", body, idempotent=True))

    def get_kernel(
        self, kernel_id: str, *, give_up: Callable[[], bool] | None = None
    ) -> KernelInfo:
        return KernelInfo.from_json(self.request("GET", f"kernels/{kernel_id}/", give_up=give_up))

    def download_artifact(self, kernel_id: str, *, expected_sha256: str | None = None) -> bytes:
        """The kernel's ``.pt2`` bytes, checked against ``X-Checksum-SHA256`` and ``expected_sha256``.

        Raises `ChecksumMismatch` on any difference, `ApiError` (409) unless validated.
        """
        response = self._send("GET", f"kernels/{kernel_id}/artifact/", stream=True)
        with response:
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > MAX_ARTIFACT_BYTES:
                raise EsperError(
                    f"artifact of kernel {kernel_id} is {declared} bytes, over the "
                    f"{MAX_ARTIFACT_BYTES}-byte limit; refusing to download it"
                )
            chunks, size = [], 0
            try:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    size += len(chunk)
                    if size > MAX_ARTIFACT_BYTES:
                        raise EsperError(
                            f"artifact of kernel {kernel_id} exceeds {MAX_ARTIFACT_BYTES} bytes; "
                            "refusing the rest"
                        )
                    chunks.append(chunk)
            except requests.RequestException as exc:
                raise RegistryUnavailable(
                    response.url, 1, f"download interrupted: {type(exc).__name__}: {exc}"
                ) from exc
            header = response.headers.get("X-Checksum-SHA256", "").strip().lower()
        data = b"".join(chunks)
        actual = hashlib.sha256(data).hexdigest()
        if header and header != actual:
            raise ChecksumMismatch(kernel_id, header, actual, where="downloaded artifact")
        if expected_sha256 is not None and expected_sha256.lower() != actual:
            raise ChecksumMismatch(kernel_id, expected_sha256, actual, where="downloaded artifact")
        return data

    def wait_for_kernel(
        self, kernel_id: str, *, timeout: float = 60, poll: float = 0.2
    ) -> KernelInfo:
        """Poll until the kernel is validated, rejected or retired (scripts and tests only).

        The training loop never blocks on a compile: it polls `get_kernel` between steps.
        """
        deadline = time.monotonic() + timeout
        while True:
            info = self.get_kernel(kernel_id)
            if info.is_final:
                return info
            if time.monotonic() >= deadline:
                raise WaitTimeout(str(kernel_id), info.status, timeout)
            time.sleep(poll)


def _error_fields(response: requests.Response) -> tuple[str, str, Any]:
    """(code, message, detail) of the server's JSON error, or a summary of a non-JSON body."""
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"]), error.get("detail") or {}
    except (ValueError, KeyError, TypeError):
        text = " ".join(response.text.split())[:200] if response.content else ""
        return f"http_{response.status_code}", text or response.reason or "no body", {}


def _json_body(response: requests.Response) -> dict:
    if not response.content:
        return {}
    try:
        return response.json()
    except ValueError as exc:
        raise EsperError(
            f"{response.request.method} {response.url} answered {response.status_code} with a "
            f"non-JSON body ({response.headers.get('Content-Type', 'no content type')}); is "
            "ESPER_URL the Esper server?"
        ) from exc
