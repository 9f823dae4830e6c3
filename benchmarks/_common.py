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


def prepare_database(env: dict | None = None) -> str:
    """Migrate (the catalogue comes with the migrations) and return a fresh API token."""
    import subprocess
    import sys

    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run(
        [*manage, "migrate", "--no-input"], env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL
    )
    subprocess.run(
        [*manage, "load_catalogue"], env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL
    )
    return subprocess.run(
        [*manage, "esper_token", "bench", "--create"],
        env=env,
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()


def wait_healthy(url: str, timeout: float = 120.0) -> bool:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
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
    """`manage.py serve` in a child process with its own ESPER_HOME: the embedded default.

    With `ESPER_URL` (and `ESPER_TOKEN`) set, the benchmark uses that server instead.
    """

    def __init__(self) -> None:
        import os

        self.url = os.environ.get("ESPER_URL")
        self.token = os.environ.get("ESPER_TOKEN")
        self._proc = None
        self._home = None

    def __enter__(self) -> EmbeddedServer:
        if self.url:
            return self
        import os
        import subprocess
        import sys
        import tempfile

        self._home = tempfile.TemporaryDirectory(prefix="esper-bench-")
        env = {
            k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")
        }
        env["ESPER_HOME"] = self._home.name
        self.token = prepare_database(env)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(Path(self._home.name) / "server.log", "wb")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), "serve", f"127.0.0.1:{port}"],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if wait_healthy(self.url):
            return self
        self.__exit__(None, None, None)
        raise RuntimeError("embedded server did not become healthy within 120 s")

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=30)
            self._log.close()
        if self._home is not None:
            self._home.cleanup()


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
