"""Reachability of the database, the broker and the workers, for `/healthz`."""

from __future__ import annotations

from django.conf import settings
from django.db import connection


def _check(fn) -> dict:
    try:
        return {"ok": True, **(fn() or {})}
    except Exception as exc:  # noqa: BLE001 - a health check reports every failure
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _database() -> dict:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return {"vendor": connection.vendor}


def _broker() -> dict:
    from esper_site.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=settings.ESPER_HEALTH_PING_TIMEOUT)
        return {"transport": conn.transport_cls}


def _workers() -> dict:
    from esper_site.celery import app
    from esper_site.embedded import worker_threads

    local = worker_threads()
    if local:
        # The embedded default's workers are threads of this process, on the solo pool: one
        # busy with a compile or a training job cannot answer a ping, yet it is up.
        stopped = sorted(name for name, alive in local.items() if not alive)
        if stopped:
            raise RuntimeError(f"embedded worker threads stopped: {', '.join(stopped)}")
        return {"workers": sorted(local), "embedded": True}
    replies = app.control.ping(timeout=settings.ESPER_HEALTH_PING_TIMEOUT)
    names = sorted(name for reply in replies for name in reply)
    if not names:
        raise RuntimeError("no worker answered a ping")
    return {"workers": names}


def health_report() -> dict:
    checks = {"database": _check(_database), "broker": _check(_broker)}
    checks["workers"] = (
        _check(_workers) if checks["broker"]["ok"] else {"ok": False, "error": "broker down"}
    )
    return {"ok": all(c["ok"] for c in checks.values()), "checks": checks}
