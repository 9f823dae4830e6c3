from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from rest_framework.authtoken.models import Token

from urza.models import Blueprint

pytestmark = [pytest.mark.django_db, pytest.mark.fast]


def test_esper_token_creates_user_and_prints_a_working_token(client):
    out = StringIO()
    call_command("esper_token", "ops", "--create", stdout=out)
    key = out.getvalue().strip()
    assert Token.objects.get(user__username="ops").key == key
    response = client.get("/api/v1/blueprints/", HTTP_AUTHORIZATION=f"Token {key}")
    assert response.status_code == 200


def test_esper_token_staff_may_pin_a_policy_version_and_a_plain_user_may_not(client):
    from django.contrib.auth import get_user_model

    call_command("esper_token", "plain", "--create", stdout=StringIO())
    out = StringIO()
    call_command("esper_token", "ops", "--create", "--staff", stdout=out)
    ops = get_user_model().objects.get(username="ops")
    assert ops.is_staff and not ops.is_superuser
    assert not get_user_model().objects.get(username="plain").is_staff
    response = client.post(
        "/api/v1/policies/1/activate/", HTTP_AUTHORIZATION=f"Token {out.getvalue().strip()}"
    )
    assert response.status_code == 404  # allowed; there is no version 1 yet


def test_esper_token_refuses_an_unknown_user_without_create():
    with pytest.raises(CommandError, match="--create"):
        call_command("esper_token", "ghost")


def test_load_catalogue_is_idempotent(catalogue):
    before = Blueprint.objects.filter(source="catalogue").count()
    assert before >= 8
    out = StringIO()
    call_command("load_catalogue", stdout=out)
    assert "0 newly registered" in out.getvalue()
    assert Blueprint.objects.filter(source="catalogue").count() == before
