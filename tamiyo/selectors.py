"""Tamiyo reads."""

from __future__ import annotations

import django_filters
from django.db.models import QuerySet

from tamiyo.models import Experience, TrainingRun
from urza.errors import ApplicationError
from urza.selectors import filtered


class RunFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=TrainingRun.Status.choices)

    class Meta:
        model = TrainingRun
        fields = ["status"]


def _visible_runs(user) -> QuerySet[TrainingRun]:
    """The runs `user` may see and act on: a staff user all of them, anyone else their own.
    ``user=None`` is the server itself (services, admin actions, tasks): no restriction."""
    runs = TrainingRun.objects.all()
    if user is None or getattr(user, "is_staff", False):
        return runs
    if not getattr(user, "is_authenticated", False) or getattr(user, "pk", None) is None:
        return runs.none()
    return runs.filter(owner=user)


def run_list(*, user, filters: dict | None = None) -> QuerySet[TrainingRun]:
    return filtered(RunFilter, _visible_runs(user).select_related("owner"), filters)


def run_get(*, run_id, user) -> TrainingRun:
    """The run, if `user` may see it; another user's run is a 404 like a missing one."""
    run = _visible_runs(user).filter(pk=run_id).first()
    if run is None:
        raise ApplicationError(f"no run {run_id}", code="not_found", status=404)
    return run


def experience_get(*, experience_id, user) -> Experience:
    """The experience, if `user` may see its run (404 otherwise, as for a missing one)."""
    experience = (
        Experience.objects.select_related("run", "policy_version")
        .filter(pk=experience_id, run__in=_visible_runs(user))
        .first()
    )
    if experience is None:
        raise ApplicationError(f"no experience {experience_id}", code="not_found", status=404)
    return experience
