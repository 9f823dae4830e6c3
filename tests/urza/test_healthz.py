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


def test_embedded_workers_count_as_up_while_too_busy_to_answer_a_ping(
    celery_worker, client, monkeypatch
):
    """The embedded default's solo-pool worker threads cannot answer a ping while they run a
    compile or a training job; /healthz checks that the threads are alive instead."""
    from esper_site import embedded
    from tests.support import served_mode

    if served_mode():
        pytest.skip("the served mode's workers are processes, which /healthz pings")
    monkeypatch.setattr(app.control, "ping", lambda **kwargs: [])  # every worker busy
    body = client.get("/healthz").json()
    assert body["ok"] is True and body["checks"]["workers"]["embedded"] is True
    assert len(body["checks"]["workers"]["workers"]) == 2

    alive = embedded.worker_threads()
    stopped = next(iter(alive))
    monkeypatch.setattr(embedded, "worker_threads", lambda: {**alive, stopped: False})
    response = client.get("/healthz")
    assert response.status_code == 503
    assert stopped in response.json()["checks"]["workers"]["error"]
