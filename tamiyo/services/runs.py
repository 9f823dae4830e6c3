"""Run writes: create a training run, change its status and merge its metrics."""

from __future__ import annotations

from django.db import transaction

from tamiyo.models import TrainingRun
from urza.errors import ApplicationError

__all__ = ["run_create", "run_update"]


def run_create(*, name: str, model_summary: dict, config: dict, owner=None) -> TrainingRun:
    """A new run. ``config`` is free-form, but its ``param_budget`` (which rewards and the
    offered kernels are computed from) must be null or a positive integer."""
    budget = config.get("param_budget")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int) or budget < 1
    ):
        message = "must be null or a positive integer (the parameters growth may add)"
        raise ApplicationError(
            f"config.param_budget: {message}", detail={"config.param_budget": [message]}
        )
    return TrainingRun.objects.create(
        name=name,
        model_summary=model_summary,
        config=config,
        owner=owner if getattr(owner, "pk", None) else None,
    )


def run_update(
    *, run: TrainingRun, status: str | None = None, metrics: dict | None = None
) -> TrainingRun:
    """Change a run's status and merge ``metrics`` into its metrics, atomically: the row is
    locked and re-read, so concurrent updates merge instead of overwriting each other, and
    the rule that a finished run keeps its status is checked on the fresh row (the ``run``
    passed in may be stale)."""
    with transaction.atomic():
        fresh = TrainingRun.objects.select_for_update().filter(pk=run.pk).first()
        if fresh is None:
            raise ApplicationError(f"no run {run.pk}", code="not_found", status=404)
        if status is not None and status != fresh.status:
            if fresh.status != TrainingRun.Status.RUNNING:
                raise ApplicationError(
                    f"run {fresh.id} is {fresh.status}; a finished run cannot change status",
                    code="run_finished",
                    status=409,
                )
            fresh.status = status
        if metrics is not None:
            fresh.metrics = {**(fresh.metrics or {}), **metrics}
        fresh.save(update_fields=["status", "metrics", "updated_at"])
    return fresh
