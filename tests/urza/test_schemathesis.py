"""Property-based fuzzing of the whole API against its own OpenAPI schema: no 5xx, ever."""

import pytest
import schemathesis
from django.core import signals
from django.db import close_old_connections
from hypothesis import HealthCheck, settings

from esper_site.wsgi import application

schema = schemathesis.openapi.from_wsgi("/api/schema/", application)
# /healthz answers 503 by design when a service is down; it takes no input and is tested alone.
schema = schema.exclude(path="/healthz")


@pytest.fixture
def auth_header(token):
    return {"Authorization": f"Token {token.key}"}


@pytest.fixture(autouse=True)
def _keep_test_connection():
    """Calling the WSGI app directly would close the test transaction's connection."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.mark.django_db
@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_never_answers_5xx_and_errors_have_the_json_shape(case, auth_header):
    response = case.call(headers=auth_header)
    assert response.status_code < 500, (case.method, case.path, response.text[:500])
    if response.status_code >= 400 and response.status_code != 405:
        body = response.json()
        assert set(body["error"]) == {"code", "message", "detail"}, body
