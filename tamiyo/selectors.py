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


def run_list(*, filters: dict | None = None) -> QuerySet[TrainingRun]:
    return filtered(RunFilter, TrainingRun.objects.select_related("owner"), filters)


def run_get(*, run_id) -> TrainingRun:
    run = TrainingRun.objects.filter(pk=run_id).first()
    if run is None:
        raise ApplicationError(f"no run {run_id}", code="not_found", status=404)
    return run


def experience_get(*, experience_id) -> Experience:
    experience = (
        Experience.objects.select_related("run", "policy_version").filter(pk=experience_id).first()
    )
    if experience is None:
        raise ApplicationError(f"no experience {experience_id}", code="not_found", status=404)
    return experience
