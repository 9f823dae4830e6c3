"""Shared helpers for the benchmarks: results go to benchmarks/results/NAME.json."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def p50(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**payload, "machine": machine()}, indent=2) + "\n")
    return path


ROOT = Path(__file__).resolve().parent.parent


def prepare_database(
    env: dict | None = None,
    user: str = "bench",
    *,
    password: str | None = None,
    staff: bool = False,
) -> str:
    """Migrate (the catalogue comes with the migrations) and return an API token for `user`
    (created if missing; with `password` it is a superuser who can log in to the admin; with
    `staff` it may pin policy versions)."""
    import subprocess
    import sys

    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run(
        [*manage, "migrate", "--no-input"], env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL
    )
    subprocess.run(
        [*manage, "load_catalogue"], env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL
    )
    extra = ["--superuser", "--password", password] if password else []
    extra += ["--staff"] if staff else []
    return subprocess.run(
        [*manage, "esper_token", user, "--create", *extra],
        env=env,
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()


def wait_healthy(url: str, timeout: float = 120.0, proc=None) -> bool:
    """Poll `/healthz` until it answers 200; False after `timeout` s or once `proc` exits."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=3) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedServer:
    """`manage.py serve` in a child process: the embedded default (SQLite, in-process broker,
    real Celery worker threads). With `ESPER_URL` (and `ESPER_TOKEN`) set, that server is used
    instead and nothing is started.

    `home=None` runs it in a temporary ESPER_HOME removed on exit (the benchmarks); a path
    keeps its database and artifacts there (the demo uses the project default `.esper`, so
    experiences accumulate across runs). `env` adds variables for the server (for example
    `TAMIYO_TRAIN_EVERY=0`); `user`/`password` name the account whose token is used, and
    `staff` makes it staff (the growth benchmark pins the policy version it trains).
    """

    def __init__(
        self,
        home: str | Path | None = None,
        *,
        env: dict | None = None,
        user: str = "bench",
        password: str | None = None,
        staff: bool = False,
        timeout: float = 120.0,
    ) -> None:
        import os

        self.url = os.environ.get("ESPER_URL")
        self.token = os.environ.get("ESPER_TOKEN")
        self.home = Path(home).resolve() if home is not None else None
        self.log_path: Path | None = None
        self._env, self._user, self._password = dict(env or {}), user, password
        self._staff = staff
        self._timeout = timeout
        self._proc = None
        self._tmp = None
        self._log = None

    @property
    def started(self) -> bool:
        """True when this object started the server (False when ESPER_URL was given)."""
        return self._proc is not None

    def __enter__(self) -> EmbeddedServer:
        if self.url:
            return self
        import os
        import subprocess
        import sys
        import tempfile

        if self.home is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="esper-bench-")
            home = Path(self._tmp.name)
        else:
            home = self.home
            home.mkdir(parents=True, exist_ok=True)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "CELERY_BROKER_URL", "ESPER_ARTIFACT_ROOT")
        }
        env.update(self._env)
        env["ESPER_HOME"] = str(home)
        try:
            self.token = prepare_database(
                env, self._user, password=self._password, staff=self._staff
            )
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            self.log_path = home / "server.log"
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in __exit__
            self._proc = subprocess.Popen(
                [sys.executable, str(ROOT / "manage.py"), "serve", f"127.0.0.1:{port}"],
                env=env,
                cwd=ROOT,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
            if wait_healthy(self.url, self._timeout, self._proc):
                return self
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.__exit__(None, None, None)
        raise RuntimeError(
            f"embedded server did not become healthy within {self._timeout:.0f} s "
            f"(its log: {self.log_path})"
        )

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - it did not stop: make sure it does
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class ServedServer:
    """gunicorn + a `celery worker` process against DATABASE_URL / CELERY_BROKER_URL (the
    served mode, Postgres + Redis); migrated, catalogue loaded, a token created."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self._procs: list = []

    def __enter__(self) -> ServedServer:
        import os
        import subprocess
        import sys

        if not os.environ.get("DATABASE_URL", "").startswith("postgres"):
            raise SystemExit(
                "--served needs DATABASE_URL=postgres://... and CELERY_BROKER_URL=redis://..."
            )
        bin_dir = Path(sys.executable).parent
        self.token = prepare_database()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._procs.append(
            subprocess.Popen(
                [
                    str(bin_dir / "gunicorn"),
                    "esper_site.wsgi:application",
                    "--bind",
                    f"127.0.0.1:{port}",
                    "--workers",
                    str(self.workers),
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
            )
        )
        self._procs.append(
            subprocess.Popen(
                [
                    str(bin_dir / "celery"),
                    "-A",
                    "esper_site",
                    "worker",
                    "-Q",
                    "compile,train",
                    "-c",
                    "1",
                    "-l",
                    "WARNING",
                ],
                cwd=ROOT,
            )
        )
        if wait_healthy(self.url):
            return self
        self.__exit__()
        raise RuntimeError("served stack did not become healthy within 120 s")

    def __exit__(self, *exc) -> None:
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            proc.wait(timeout=30)
