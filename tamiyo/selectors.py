"""Tamiyo reads: runs and experiences a user may see, the catalogue as the policy sees it,
and the experiences policy training learns from."""

from __future__ import annotations

import hashlib
import json
import math

import django_filters
from django.db.models import QuerySet

from tamiyo.models import Experience, TrainingRun
from urza.errors import ApplicationError
from urza.models import Blueprint
from urza.selectors import filtered

__all__ = [
    "catalogue_descriptors",
    "experience_get",
    "run_get",
    "run_list",
    "training_experiences",
]


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


def catalogue_descriptors() -> tuple[list[dict], list[Blueprint]]:
    """(descriptors, blueprints): the active blueprints in catalogue order, and each as the
    policy sees it (``params_estimate`` is filled in per decision)."""
    blueprints = list(
        Blueprint.objects.filter(status=Blueprint.Status.ACTIVE).order_by("name", "version")
    )
    descriptors = [
        {"id": str(b.id), "name": b.name, "graft": b.ir["graft"], "layout": b.ir["layout"]}
        for b in blueprints
    ]
    return descriptors, blueprints


def _run_cohort(run: TrainingRun, behaviour: set[tuple[str, int | None]]) -> str:
    """Runs whose endings compare: the same model summary, step count and behaviour (the
    policies, with their versions, that made its decisions). Comparing a run only with runs
    of the same behaviour credits what that behaviour's choices did, not which policy ran:
    across policies, the random policy's early grafts made every early graft look bad."""
    key = {
        "model": run.model_summary,
        "total_steps": (run.config or {}).get("total_steps"),
        "behaviour": sorted(behaviour, key=str),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_final_metric(run: TrainingRun) -> float | None:
    """A finished run's final validation metric (run metrics ``final_metric``), if it is a
    finite number; anything else a client stored there counts as none."""
    value = (run.metrics or {}).get("final_metric")
    if run.status != TrainingRun.Status.FINISHED or isinstance(value, bool):
        return None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def training_experiences(*, limit: int | None = None) -> list[dict]:
    """The rewarded experiences as `tamiyo.training` reads them (the newest `limit`), each
    with its run's cohort and final metric."""
    qs = Experience.objects.filter(reward__isnull=False).order_by("created_at")
    if limit:
        qs = qs.reverse()[:limit]
    rows = list(qs)
    behaviour: dict = {}
    for e in rows:
        behaviour.setdefault(e.run_id, set()).add((e.policy_name, e.policy_version_id))
    runs = {
        pk: (_run_cohort(run, behaviour[pk]), _run_final_metric(run))
        for pk, run in TrainingRun.objects.in_bulk(list(behaviour)).items()
    }
    return [
        {
            "state": e.state,
            "blueprints": e.blueprints,
            "fits": e.fits,
            "action": {k: e.action.get(k) for k in ("action", "layer", "seed", "blueprint_index")},
            "behavior_logprob": e.behavior_logprob,
            "reward": e.reward,
            "run": str(e.run_id),
            "cohort": runs[e.run_id][0],
            "final_metric": runs[e.run_id][1],
        }
        for e in rows
    ]
