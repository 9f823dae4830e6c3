"""Kernel cache: an in-memory LRU (by entries and bytes) over an optional on-disk layer.

The disk layer keeps artifacts as ``<disk_dir>/<sha256>.pt2`` and a small JSON index
``kernel_id -> {sha256, signature}``, so a restarted process finds a kernel's bytes without
downloading them, and without asking the registry for metadata when it is down. Files are
written to a temporary name and renamed into place, so none is ever half-written, and every
read is verified against its sha256 (a corrupt file is deleted and counts as a miss).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from kasmina.errors import ChecksumMismatch

__all__ = ["CacheEntry", "KernelCache"]

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_VERSION = 1


@dataclass(frozen=True, slots=True, eq=False)
class CacheEntry:
    """A kernel's verified artifact and, once deserialised, a pristine template module.

    The template is never handed out or trained: callers get copies (see `kasmina.loader`).
    """

    kernel_id: str
    sha256: str
    signature: dict
    artifact: bytes
    template: nn.Module | None = None

    @property
    def nbytes(self) -> int:
        """Memory it holds: the artifact plus the template's parameters and buffers."""
        size = len(self.artifact)
        if self.template is not None:
            tensors = itertools.chain(self.template.parameters(), self.template.buffers())
            size += sum(t.numel() * t.element_size() for t in tensors)
        return size


class KernelCache:
    """Thread-safe LRU of `CacheEntry` keyed by kernel id; ``get`` is O(1) and copies nothing."""

    def __init__(
        self,
        max_entries: int = 64,
        max_bytes: int = 256 * 2**20,
        disk_dir: str | os.PathLike | None = None,
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(
                f"max_entries and max_bytes must be positive, got {max_entries}, {max_bytes}"
            )
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, tuple[CacheEntry, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = self._disk_hits = self._disk_corrupt = 0
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self._disk_lock = threading.Lock()
        self._index: dict[str, dict] = {}
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            self._index = self._read_index()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, kernel_id: object) -> bool:
        """In memory (no stats are counted and the disk is not read)."""
        return str(kernel_id) in self._entries

    def __repr__(self) -> str:
        return (
            f"KernelCache(entries={len(self._entries)}/{self.max_entries}, "
            f"bytes={self._bytes}/{self.max_bytes}, disk_dir={self.disk_dir})"
        )

    # --- memory ---------------------------------------------------------------------------

    def get(self, kernel_id: str) -> CacheEntry | None:
        """The entry from memory, else from disk (verified, template None), else None."""
        if type(kernel_id) is not str:
            kernel_id = str(kernel_id)
        with self._lock:
            item = self._entries.get(kernel_id)
            if item is not None:
                self._entries.move_to_end(kernel_id)
                self._hits += 1
                return item[0]
            record = self._index.get(kernel_id) if self.disk_dir is not None else None
            if record is None:
                self._misses += 1
                return None
        artifact = self._disk_read(record["sha256"])
        if artifact is None:
            with self._lock:
                self._misses += 1
            return None
        entry = CacheEntry(kernel_id, record["sha256"], record.get("signature") or {}, artifact)
        with self._lock:
            self._disk_hits += 1
            self._insert(entry, entry.nbytes)
        return entry

    def put(self, entry: CacheEntry) -> None:
        """Insert or replace ``entry`` (most recent); evict least recent beyond the limits.

        With a disk layer the artifact is also written there (verified first) and indexed.
        """
        if self.disk_dir is not None:
            self._disk_write(entry)
        size = entry.nbytes
        with self._lock:
            self._insert(entry, size)

    def _insert(self, entry: CacheEntry, size: int) -> None:
        old = self._entries.pop(entry.kernel_id, None)
        if old is not None:
            self._bytes -= old[1]
        if size > self.max_bytes:
            logger.warning(
                "kernel %s (%d bytes) is larger than the memory cache (%d); not kept in memory",
                entry.kernel_id,
                size,
                self.max_bytes,
                extra={"kernel_id": entry.kernel_id, "bytes": size, "max_bytes": self.max_bytes},
            )
            return
        self._entries[entry.kernel_id] = (entry, size)
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, (_, evicted_size) = self._entries.popitem(last=False)
            self._bytes -= evicted_size
            self._evictions += 1

    def discard(self, kernel_id: str) -> bool:
        """Drop the memory entry (the disk copy stays: it is verified whenever it is read)."""
        with self._lock:
            item = self._entries.pop(str(kernel_id), None)
            if item is not None:
                self._bytes -= item[1]
            return item is not None

    def stats(self) -> dict:
        with self._lock:
            return {
                "hits": self._hits,
                "misses": self._misses,
                "evictions": self._evictions,
                "bytes": self._bytes,
                "entries": len(self._entries),
                "disk_hits": self._disk_hits,
                "disk_corrupt": self._disk_corrupt,
            }

    def clear(self, *, disk: bool = False) -> None:
        """Empty the memory layer (and with ``disk=True`` delete the disk layer's files)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
        if disk and self.disk_dir is not None:
            with self._disk_lock:
                for path in self.disk_dir.glob("*.pt2"):
                    path.unlink(missing_ok=True)
                (self.disk_dir / INDEX_NAME).unlink(missing_ok=True)
                self._index = {}

    # --- disk -----------------------------------------------------------------------------

    def artifact_path(self, sha256: str) -> Path:
        if self.disk_dir is None:
            raise ValueError("this KernelCache has no disk_dir")
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.disk_dir / f"{sha256}.pt2"

    def get_artifact(self, sha256: str) -> bytes | None:
        """Verified bytes with this sha256 from memory or disk, or None (nothing is counted missing)."""
        with self._lock:
            for entry, _ in self._entries.values():
                if entry.sha256 == sha256:
                    return entry.artifact
        if self.disk_dir is None:
            return None
        artifact = self._disk_read(sha256)
        if artifact is not None:
            with self._lock:
                self._disk_hits += 1
        return artifact

    def _disk_read(self, sha256: str) -> bytes | None:
        path = self.artifact_path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning(
                "disk cache read of %s failed: %s",
                path,
                exc,
                extra={"path": str(path), "error": str(exc)},
            )
            return None
        actual = hashlib.sha256(data).hexdigest()
        if actual == sha256:
            return data
        logger.warning(
            "corrupt file in the disk cache deleted: %s",
            path,
            extra={"path": str(path), "expected": sha256, "actual": actual},
        )
        with self._disk_lock:
            path.unlink(missing_ok=True)
            stale = [kid for kid, rec in self._index.items() if rec.get("sha256") == sha256]
            for kid in stale:
                del self._index[kid]
            self._write_index(drop=stale)
        with self._lock:
            self._disk_corrupt += 1
        return None

    def _disk_write(self, entry: CacheEntry) -> None:
        path = self.artifact_path(entry.sha256)
        record = {"sha256": entry.sha256, "signature": entry.signature}
        with self._disk_lock:
            if not path.exists():
                actual = hashlib.sha256(entry.artifact).hexdigest()
                if actual != entry.sha256:
                    raise ChecksumMismatch(
                        entry.kernel_id, entry.sha256, actual, where="cache entry"
                    )
                _atomic_write(path, entry.artifact)
            if self._index.get(entry.kernel_id) != record:
                self._index[entry.kernel_id] = record
                self._write_index()

    def _read_index(self) -> dict[str, dict]:
        path = self.disk_dir / INDEX_NAME
        try:
            body = json.loads(path.read_text())
            kernels = body["kernels"] if body.get("version") == INDEX_VERSION else {}
            return {
                str(kid): rec
                for kid, rec in kernels.items()
                if isinstance(rec, dict) and isinstance(rec.get("sha256"), str)
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning(
                "unreadable disk cache index %s ignored: %s",
                path,
                exc,
                extra={"path": str(path), "error": str(exc)},
            )
            return {}

    def _write_index(self, drop: list[str] | tuple[str, ...] = ()) -> None:
        """Merge ours into what is on disk (another process may share the directory)."""
        merged = {**self._read_index(), **self._index}
        for kid in drop:
            merged.pop(kid, None)
        body = json.dumps({"version": INDEX_VERSION, "kernels": merged}, sort_keys=True)
        _atomic_write(self.disk_dir / INDEX_NAME, body.encode())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
