"""Test helpers that start real Celery workers (threads in embedded mode, processes served)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

from django.conf import settings
from django.db import connection

from esper_site.celery import app

ROOT = Path(__file__).resolve().parent.parent


def served_mode() -> bool:
    return connection.vendor == "postgresql" and not settings.ESPER_EMBEDDED_BROKER


def database_url() -> str:
    """URL of the database the tests use right now (the test database once it is set up)."""
    db = connection.settings_dict
    auth = quote(db["USER"] or "")
    if db.get("PASSWORD"):
        auth += ":" + quote(db["PASSWORD"])
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{auth}@{host}:{port}/{db['NAME']}"


def wait_for_ping(hostname: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app.control.ping(destination=[hostname], timeout=1.0)
        if replies:
            return
    raise RuntimeError(f"worker {hostname} did not answer a ping within {timeout:.0f} s")


class WorkerProcess:
    """A `celery -A esper_site worker` process against the test database and broker."""

    def __init__(
        self,
        *,
        artifact_root: str,
        queues: str = "compile,train",
        log_dir: Path,
        extra_env: dict[str, str] | None = None,
    ):
        self.hostname = f"pytest-{uuid.uuid4().hex[:8]}@{os.uname().nodename}"
        self.log_path = log_dir / f"{self.hostname.split('@')[0]}.log"
        env = os.environ | {
            "DATABASE_URL": database_url(),
            "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
            "ESPER_ARTIFACT_ROOT": artifact_root,
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "esper_site",
                "worker",
                "-Q",
                queues,
                "-c",
                "1",
                "-n",
                self.hostname,
                "-l",
                "INFO",
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_ping(self.hostname)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"worker failed to start; log:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crashed machine would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 9)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def wait_until(predicate, *, timeout: float = 90.0, interval: float = 0.2, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
