from __future__ import annotations

import gc
import os
import socket
import threading
import time

import pytest
from django.conf import settings
from django.test import override_settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.support import WorkerProcess, served_mode

REQUIRE_SERVICES = os.environ.get("ESPER_REQUIRE_SERVICES") == "1"


def _services_problem() -> str | None:
    """Why the served mode is not usable here, or None."""
    db = settings.DATABASES["default"]
    if db["ENGINE"] != "django.db.backends.postgresql":
        return f"DATABASE_URL is not Postgres (engine {db['ENGINE']})"
    if not settings.CELERY_BROKER_URL.startswith("redis://"):
        return f"CELERY_BROKER_URL is not Redis ({settings.CELERY_BROKER_URL})"
    for name, host, port in (
        ("postgres", db.get("HOST") or "127.0.0.1", int(db.get("PORT") or 5432)),
        ("redis", "127.0.0.1", int(settings.CELERY_BROKER_URL.split(":")[2].split("/")[0])),
    ):
        try:
            socket.create_connection((host, port), timeout=3).close()
        except OSError as exc:
            return f"{name} at {host}:{port} is not answering ({exc})"
    return None


def pytest_sessionstart(session):
    if REQUIRE_SERVICES:
        problem = _services_problem()
        if problem:
            pytest.exit(f"ESPER_REQUIRE_SERVICES=1 but {problem}", returncode=3)


def pytest_collection_modifyitems(config, items):
    served = _services_problem() is None
    skip = pytest.mark.skip(
        reason="served mode only: set DATABASE_URL (Postgres) and CELERY_BROKER_URL (Redis)"
    )
    for item in items:
        if "served" in item.keywords and not served:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def live_server(live_server):
    """pytest-django's live server, and at the end of the session the clients' idle pooled
    connections to it let go: a handler thread parked on a keep-alive connection holds its
    own database connection (Django closes it when the HTTP connection ends), and on
    Postgres an open one stops the test database from being dropped."""
    yield live_server
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _handler_threads(live_server):
        gc.collect()  # clients the tests dropped close their sockets, and those handlers end
        time.sleep(0.05)


def _handler_threads(server) -> list[threading.Thread]:
    daemon = server.thread
    return [
        t
        for t in threading.enumerate()
        if t.daemon and t is not daemon and "process_request" in t.name
    ]


@pytest.fixture(scope="session")
def artifact_root(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session", autouse=True)
def _isolated_artifacts(artifact_root):
    storages = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "urza.storage.AtomicFileSystemStorage",
            "OPTIONS": {"location": str(artifact_root)},
        },
    }
    with override_settings(STORAGES=storages, MEDIA_ROOT=str(artifact_root)):
        yield


@pytest.fixture
def user(db, django_user_model):
    return django_user_model.objects.create_user(username="researcher", password="pw-123456")


@pytest.fixture
def token(user):
    return Token.objects.create(user=user)


@pytest.fixture
def api_client(token):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def anon_client():
    return APIClient()


@pytest.fixture(scope="session")
def _worker_session(django_db_setup, django_db_blocker, artifact_root, tmp_path_factory):
    """Real Celery workers for the whole session: processes when served, threads embedded."""
    from esper_site.celery import app

    if served_mode():
        app.control.purge()
        worker = WorkerProcess(
            artifact_root=str(artifact_root), log_dir=tmp_path_factory.mktemp("worker-logs")
        )
        yield worker
        worker.stop()
    else:
        from esper_site.embedded import start_worker_threads

        yield start_worker_threads()


@pytest.fixture
def celery_worker(_worker_session, transactional_db):
    """A running worker; the test must use committed data, so it is transactional."""
    return _worker_session


@pytest.fixture
def catalogue(db):
    """The standard catalogue (migrations load it, but transactional tests flush it)."""
    from io import StringIO

    from django.core.management import call_command

    call_command("load_catalogue", stdout=StringIO())
