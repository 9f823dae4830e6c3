"""Policy writes: load and activate stored versions, train a candidate from the stored
experiences and keep it as a new version."""

from __future__ import annotations

import hashlib
import logging
import math
import threading

from django.conf import settings
from django.core.files.base import ContentFile
from django.db import transaction
from django.db.models import Max

from tamiyo.models import PolicyVersion
from tamiyo.policy import GNNPolicy, HeuristicPolicy
from tamiyo.reward import terminal_credit
from tamiyo.selectors import training_experiences
from urza.errors import ApplicationError

__all__ = [
    "TrainingDiverged",
    "policy_activate",
    "policy_active",
    "policy_load",
    "policy_train",
    "policy_train_enqueue",
    "policy_version_create",
]

logger = logging.getLogger(__name__)

_policy_cache: dict[int, tuple[str, GNNPolicy]] = {}
_policy_lock = threading.Lock()


def policy_load(*, version: PolicyVersion) -> GNNPolicy:
    """The GNN of a stored version; the checkpoint's sha256 is checked before it is read."""
    with _policy_lock:
        cached = _policy_cache.get(version.version)
        if cached and cached[0] == version.checkpoint_sha256:
            return cached[1]
    try:
        with version.checkpoint.open("rb") as handle:
            data = handle.read()
    except (OSError, ValueError) as exc:  # a missing file, or no file named at all
        raise ApplicationError(
            f"checkpoint of policy v{version.version} cannot be read ({exc}); retrain or "
            "restore the file",
            code="checkpoint_missing",
            status=409,
        ) from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != version.checkpoint_sha256:
        raise ApplicationError(
            f"checkpoint of policy v{version.version} has sha256 {digest}, expected "
            f"{version.checkpoint_sha256}; retrain or restore the file",
            code="checkpoint_corrupt",
            status=409,
        )
    try:
        policy = GNNPolicy.load_safetensors(data, version.config)
    except ValueError as exc:
        raise ApplicationError(
            f"policy v{version.version} cannot be loaded: {exc}", code="policy_unusable", status=409
        ) from exc
    policy.eval()
    with _policy_lock:
        _policy_cache[version.version] = (digest, policy)
    return policy


def policy_active() -> tuple[object, PolicyVersion | None, str]:
    """(policy, version, name): the active GNN, else the heuristic cold-start policy."""
    version = PolicyVersion.objects.filter(is_active=True).first()
    if version is not None:
        try:
            return policy_load(version=version), version, "gnn"
        except ApplicationError as exc:
            logger.error(
                "active policy unusable; deciding with the heuristic", extra={"error": exc.message}
            )
    return HeuristicPolicy(), None, "heuristic"


def policy_train_enqueue(*, seed: int = 0, epochs: int | None = None) -> None:
    from esper_site.celery import app

    app.send_task("tamiyo.train_policy", kwargs={"seed": seed, "epochs": epochs}, queue="train")


def _json_safe(value):
    """JSON has no NaN or infinity: a number that could not be computed is stored as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def policy_version_create(
    *, policy: GNNPolicy, metrics: dict, experience_count: int, activate: bool
) -> PolicyVersion:
    bad = policy.non_finite_parameters()
    if bad:
        raise ApplicationError(
            f"the policy holds non-finite weights ({', '.join(bad[:5])}); it is not kept as a "
            "version",
            code="policy_unusable",
            status=409,
        )
    metrics = _json_safe(metrics)
    data = policy.save_safetensors()
    digest = hashlib.sha256(data).hexdigest()
    with transaction.atomic():
        number = (
            PolicyVersion.objects.select_for_update().aggregate(m=Max("version"))["m"] or 0
        ) + 1
        version = PolicyVersion(
            version=number,
            config=policy.config(),
            checkpoint_sha256=digest,
            metrics=metrics,
            experience_count=experience_count,
        )
        version.checkpoint.save("policy.safetensors", ContentFile(data), save=False)
        version.save()
        if activate:
            policy_activate(version=version)
    return version


def policy_activate(*, version: PolicyVersion) -> PolicyVersion:
    """Make `version` the policy every run's decisions use (and the start point of the next
    training job); the previously active one is deactivated. Refuses (409
    ``checkpoint_corrupt`` / ``checkpoint_missing`` / ``policy_unusable``) a version whose
    checkpoint does not load, so a bad file never becomes the active policy."""
    policy_load(version=version)
    with transaction.atomic():
        PolicyVersion.objects.filter(is_active=True).exclude(pk=version.pk).update(is_active=False)
        PolicyVersion.objects.filter(pk=version.pk).update(is_active=True)
    version.refresh_from_db()
    return version


class TrainingDiverged(ApplicationError):
    """A training job produced non-finite losses or weights; no version was kept."""


def _check_trained(result) -> None:
    """Refuse (`TrainingDiverged`, which fails the job) a candidate whose training loss or
    weights are not finite: such a version would answer every decision with NaN."""
    loss = result.metrics.get("train_loss")
    bad = result.policy.non_finite_parameters()
    if bad or (loss is not None and not math.isfinite(loss)):
        message = (
            f"policy training diverged (train_loss {loss}, non-finite weights: "
            f"{', '.join(bad[:5]) or 'none'}); no version was kept"
        )
        logger.error(message, extra={"train_loss": loss, "non_finite": bad[:5]})
        raise TrainingDiverged(message, code="training_diverged", status=409)


def policy_train(
    *,
    seed: int = 0,
    epochs: int | None = None,
    limit: int = 5000,
    terminal_weight: float | None = None,
) -> dict:
    """Train a candidate from the stored experiences; keep it as a new version, and make it
    active only if its held-out score is no worse than the current policy's. Rewards are
    blended with their runs' terminal credit (`tamiyo.reward.terminal_credit`) for both, by
    `terminal_weight` (None: the TAMIYO_TERMINAL_WEIGHT setting)."""
    from tamiyo.training import DEFAULT_EPOCHS, MIN_EXPERIENCES, evaluate_policy, train_policy

    if terminal_weight is None:
        terminal_weight = settings.TAMIYO_TERMINAL_WEIGHT
    experiences, terminal = terminal_credit(
        training_experiences(limit=limit), weight=terminal_weight
    )
    if len(experiences) < MIN_EXPERIENCES:
        return {
            "status": "skipped",
            "reason": f"need at least {MIN_EXPERIENCES} experiences "
            f"with rewards, have {len(experiences)}",
        }
    current, current_version, current_name = policy_active()
    start = current if isinstance(current, GNNPolicy) else None
    result = train_policy(start, experiences, seed=seed, epochs=epochs or DEFAULT_EPOCHS)
    _check_trained(result)
    heldout = [experiences[i] for i in result.heldout_indices]
    candidate_score = evaluate_policy(result.policy, heldout)
    current_score = evaluate_policy(current, heldout)
    # NaN means no held-out weight: a candidate that can't be scored never replaces anything.
    better = candidate_score == candidate_score and (
        current_score != current_score or candidate_score >= current_score
    )
    metrics = {
        **result.metrics,
        "heldout_score_candidate": candidate_score,
        "heldout_score_current": current_score,
        "compared_with": current_name if current_version is None else f"v{current_version.version}",
        "terminal_credit": terminal,
    }
    version = policy_version_create(
        policy=result.policy, metrics=metrics, experience_count=len(experiences), activate=better
    )
    return {
        "status": "trained",
        "version": version.version,
        "activated": better,
        "heldout_score": candidate_score,
        "current_score": current_score,
    }
