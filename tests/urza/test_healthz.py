import pytest

from esper_site.celery import app


@pytest.mark.fast
def test_healthz_reports_database_broker_and_a_live_worker(celery_worker, client):
    response = client.get("/healthz")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["ok"] is True
    assert body["checks"]["database"]["ok"] and body["checks"]["broker"]["ok"]
    assert body["checks"]["workers"]["workers"]


@pytest.mark.django_db
def test_healthz_answers_503_naming_the_broker_when_it_is_unreachable(client, monkeypatch):
    real = app.connection_for_write
    # Port 1 refuses connections: the broker the server is configured for is unreachable.
    monkeypatch.setattr(app, "connection_for_write", lambda: real("redis://127.0.0.1:1/0"))
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["broker"]["ok"] is False
    assert "error" in body["checks"]["broker"]
    assert body["checks"]["workers"]["ok"] is False
