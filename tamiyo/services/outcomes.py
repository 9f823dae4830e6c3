"""Outcome writes: store a decision's measured outcome and its reward, once, and schedule
policy training as rewarded experiences accumulate."""

from __future__ import annotations

from django.conf import settings
from django.db import transaction

from tamiyo.models import Experience
from tamiyo.reward import compute_reward
from tamiyo.services.policies import policy_train_enqueue
from urza.errors import ApplicationError

__all__ = ["experience_record_outcome"]


def _same_json(a: object, b: object) -> bool:
    """JSON equality without Python's loose kinds: ``false`` is not ``0`` (``True == 1`` in
    Python). Numbers compare by value (``1`` and ``1.0`` are the same JSON number)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _outcome_taken(experience: Experience) -> ApplicationError:
    return ApplicationError(
        f"experience {experience.id} already has an outcome; outcomes are reported once",
        code="outcome_exists",
        status=409,
    )


def experience_record_outcome(*, experience: Experience, outcome: object) -> Experience:
    """Store the runtime's measured outcome and the reward computed from it (once).

    Every report goes through the same validation (a 400 naming the field), also a repeat.
    A repeat of the stored outcome (strict JSON equality: ``false`` is not ``0``) is
    answered with the experience; any other outcome with 409 ``outcome_exists`` -- also
    when another report lands between this one's read and its write."""
    budget = experience.run.config.get("param_budget")
    try:
        reward = compute_reward(outcome, action=experience.action["action"], param_budget=budget)
    except ValueError as exc:
        raise ApplicationError(f"outcome: {exc}", detail={"outcome": [str(exc)]}) from exc
    if experience.outcome is None:
        updated = Experience.objects.filter(pk=experience.pk, outcome__isnull=True).update(
            outcome=outcome, reward=reward
        )
        experience.refresh_from_db()
        if updated:
            _maybe_schedule_training()
            return experience
    if not _same_json(experience.outcome, outcome):
        raise _outcome_taken(experience)
    return experience  # a retried report (or the same outcome sent twice at once)


def _maybe_schedule_training() -> None:
    """Queue a training job when the count of rewarded experiences reaches a multiple of
    TAMIYO_TRAIN_EVERY (from 32, the fewest a job trains on). Two outcomes committed at once
    can both count past a multiple; that job is then queued at the next one."""
    every = settings.TAMIYO_TRAIN_EVERY
    if not every:
        return
    rewarded = Experience.objects.filter(reward__isnull=False).count()
    if rewarded >= 32 and rewarded % every == 0:
        transaction.on_commit(lambda: policy_train_enqueue(seed=rewarded))
