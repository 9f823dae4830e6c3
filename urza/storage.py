"""Artifact storage. Writes are atomic: a half-written artifact is never visible."""

from __future__ import annotations

import hashlib
import os
import tempfile

from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, default_storage


class AtomicFileSystemStorage(FileSystemStorage):
    """Writes to a temporary file in the target folder, fsyncs, then renames into place.

    Artifact names are content addressed (their sha256), so an existing file with the
    same name already holds the same bytes and is kept rather than renamed.
    """

    def get_available_name(self, name: str, max_length: int | None = None) -> str:
        return name

    def _save(self, name: str, content) -> str:
        full_path = self.path(name)
        directory = os.path.dirname(full_path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".partial-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                if hasattr(content, "chunks"):
                    for chunk in content.chunks():
                        out.write(chunk)
                else:
                    out.write(content.read())
                out.flush()
                os.fsync(out.fileno())
            if self.file_permissions_mode is not None:
                os.chmod(tmp_path, self.file_permissions_mode)
            os.replace(tmp_path, full_path)
        except BaseException:
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)
            raise
        return name.replace("\\", "/")


def artifact_save(*, name: str, data: bytes) -> str:
    """Store bytes under a content-addressed name; returns the stored name."""
    if default_storage.exists(name) and default_storage.size(name) == len(data):
        return name
    return default_storage.save(name, ContentFile(data))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
