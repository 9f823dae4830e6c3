"""Tamiyo's writes: runs, decisions (with the active policy), outcomes and policy versions."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from functools import lru_cache

import torch
from django.conf import settings
from django.core.files.base import ContentFile
from django.db import IntegrityError, transaction
from django.db.models import Max

from tamiyo.graph import GraphError, to_data, validate_graph
from tamiyo.models import Experience, PolicyVersion, TrainingRun
from tamiyo.policy import ActionDistribution, GNNPolicy, HeuristicPolicy, create_policy
from tamiyo.reward import compute_reward, terminal_credit
from urza import services as urza_services
from urza.errors import ApplicationError
from urza.models import Blueprint

logger = logging.getLogger(__name__)

POLICY_NAMES = ("gnn", "heuristic", "random")


# -- runs -------------------------------------------------------------------------------
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


# -- the catalogue as the policy sees it ------------------------------------------------
def catalogue_descriptors() -> tuple[list[dict], list[Blueprint]]:
    blueprints = list(
        Blueprint.objects.filter(status=Blueprint.Status.ACTIVE).order_by("name", "version")
    )
    descriptors = [
        {"id": str(b.id), "name": b.name, "graft": b.ir["graft"], "layout": b.ir["layout"]}
        for b in blueprints
    ]
    return descriptors, blueprints


@lru_cache(maxsize=8192)
def _site_params(
    ir_sha256: str, graft: str, layout: str, n_in: int, n_out: int, dtype: str
) -> int | None:
    """Parameters of that blueprint's kernel for the site, or None if it does not fit. The IR
    comes from `_irs` (filled by `feasibility` from the blueprints it was given; an IR is
    fixed by its sha256), so no query runs per (site, blueprint) pair."""
    ir = _irs.get(ir_sha256)
    if ir is None:
        blueprint = Blueprint.objects.filter(ir_sha256=ir_sha256).only("ir").first()
        if blueprint is None:
            return None
        ir = blueprint.ir
    signature = {"graft": graft, "layout": layout, "in": n_in, "out": n_out, "dtype": dtype}
    try:
        return urza_services.kernel_param_count(ir=ir, signature=signature)
    except ApplicationError:
        return None


_irs: dict[str, dict] = {}  # ir_sha256 -> IR of the blueprints feasibility saw last


def budget_left(*, doc: dict, run: TrainingRun) -> float:
    """Parameters the run may still add: its `param_budget` × (1 − budget_used); inf if none."""
    budget = (run.config or {}).get("param_budget")
    if not isinstance(budget, int) or isinstance(budget, bool) or not 0 < budget < 2**63:
        return math.inf  # none, or beyond anything a model holds
    return budget * max(0.0, 1.0 - float(doc["globals"]["budget_used"]))


def site_dims(layer: dict, graft: str, inputs: dict[str, int]) -> tuple[int, int] | None:
    """(in, out) widths a `graft` seed of `layer` reads and writes; None where it cannot live
    (a bridge seed reads the input of the layer's bridge source, if it has one). ``inputs``:
    each layer's input width by name."""
    if graft != "bridge":
        return layer["in"], layer["out"]
    source = layer["bridge_from"]
    return None if source is None else (inputs[source], layer["out"])


def _inputs(doc: dict) -> dict[str, int]:
    return {layer["name"]: layer["in"] for layer in doc["layers"]}


def feasibility(
    *, doc: dict, blueprints: list[Blueprint], dtype: str, budget: float = math.inf
) -> tuple[list[list[bool]], list[int | None]]:
    """(fits, estimates). ``fits``: which (seed site, blueprint) pairs the compiler accepts
    for that layer's dims and whose kernel fits in `budget` parameters (the run's remaining
    parameter budget). ``estimates``: each blueprint's mean kernel size over the layers it
    compiles for (None where it compiles for none): the descriptors' ``params_estimate``."""
    rows: list[list[bool]] = []
    sizes: list[list[int]] = [[] for _ in blueprints]
    inputs = _inputs(doc)
    if len(_irs) > 4 * len(blueprints) + 64:
        _irs.clear()  # blueprints retired since; the registry's active ones come back below
    _irs.update({b.ir_sha256: b.ir for b in blueprints})
    for layer in doc["layers"]:
        row = []
        for k, b in enumerate(blueprints):
            dims = site_dims(layer, b.ir["graft"], inputs)
            params = (
                None
                if dims is None
                else _site_params(b.ir_sha256, b.ir["graft"], layer["layout"], *dims, dtype)
            )
            if params is not None:
                sizes[k].append(params)
            row.append(params is not None and params <= budget)
        rows.extend([row] * len(layer["seeds"]))
    return rows, [round(sum(s) / len(s)) if s else None for s in sizes]


# -- policies ---------------------------------------------------------------------------
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


def _rng() -> torch.Generator:
    """A fresh sampling seed per decision (its log-probability is what is recorded)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


# -- decisions and outcomes -------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """What a decision is drawn from: the validated graph, the catalogue as the policy saw
    it, the feasible (site, blueprint) pairs, and the deciding policy's exact distribution."""

    doc: dict
    descriptors: list[dict]
    blueprints: list[Blueprint]
    fits: list[list[bool]]
    distribution: ActionDistribution
    policy_name: str
    version: PolicyVersion | None


def decision_distribution(
    *, run: TrainingRun, graph: object, policy_name: str | None = None, dtype: str = "float32"
) -> Choice:
    """The action distribution `decision_make` samples from for this run and graph: the
    active policy's (or the named baseline's) over the catalogue's feasible grafts."""
    try:
        doc = validate_graph(graph)
    except GraphError as exc:
        field = f"graph.{exc.field}" if getattr(exc, "field", "") else "graph"
        raise ApplicationError(
            f"{field}: {getattr(exc, 'message', exc)}", detail={field: [str(exc)]}
        ) from exc
    descriptors, blueprints = catalogue_descriptors()
    fits, estimates = feasibility(
        doc=doc, blueprints=blueprints, dtype=dtype, budget=budget_left(doc=doc, run=run)
    )
    for descriptor, estimate in zip(descriptors, estimates, strict=True):
        descriptor["params_estimate"] = estimate
    version = None
    if policy_name in (None, "gnn"):
        policy, version, used = policy_active()
    else:
        policy, used = create_policy(policy_name), policy_name
    data = to_data(doc)
    fits_mask = torch.tensor(fits, dtype=torch.bool).reshape(len(fits), len(blueprints))
    with torch.no_grad():
        distribution = policy.distribution(data, descriptors, fits=fits_mask)
        if used == "gnn" and not _usable(distribution):
            # Features are bounded (tamiyo.graph) and versions with non-finite weights are
            # refused, so this is a last resort: never sample from a NaN distribution.
            logger.error(
                "active policy produced a non-finite action distribution; deciding with the "
                "heuristic",
                extra={"policy_version": version.version if version else None},
            )
            policy, version, used = HeuristicPolicy(), None, "heuristic"
            distribution = policy.distribution(data, descriptors, fits=fits_mask)
    return Choice(doc, descriptors, blueprints, fits, distribution, used, version)


def _usable(distribution: ActionDistribution) -> bool:
    """Its probabilities are a distribution: no NaN, no +inf, some legal action."""
    logp = distribution.log_probs()
    return bool(not torch.isnan(logp).any() and (logp < math.inf).all() and logp.isfinite().any())


def decision_make(
    *,
    run: TrainingRun,
    graph: object,
    policy_name: str | None = None,
    greedy: bool = False,
    dtype: str = "float32",
    epoch: int = 0,
) -> Experience:
    """Decide with the active policy (or the named baseline), record the experience, and
    request the kernel of a germinate decision (its compile is queued after commit).

    ``greedy`` takes the policy's most likely legal action instead of sampling one: what a
    run that wants the policy's best guess asks for, with no exploration. That behaviour is
    deterministic, so the experience records a behaviour log-probability of 0 (probability
    1), which keeps off-policy training's importance weights right."""
    if run.status != TrainingRun.Status.RUNNING:
        raise ApplicationError(
            f"run {run.id} is {run.status}; decisions are made for running runs",
            code="run_finished",
            status=409,
        )
    choice = decision_distribution(run=run, graph=graph, policy_name=policy_name, dtype=dtype)
    doc, blueprints = choice.doc, choice.blueprints
    decision = choice.distribution.decision(rng=_rng(), greedy=greedy, policy=choice.policy_name)
    action = decision.as_action()
    try:
        with transaction.atomic():
            kernel = None
            if decision.action == "germinate":
                blueprint = blueprints[decision.blueprint_index]
                layer = next(la for la in doc["layers"] if la["name"] == decision.layer)
                n_in, n_out = site_dims(layer, blueprint.ir["graft"], _inputs(doc))
                signature = {
                    "graft": blueprint.ir["graft"],
                    "layout": layer["layout"],
                    "in": n_in,
                    "out": n_out,
                    "dtype": dtype,
                }
                kernel, _ = urza_services.kernel_request(blueprint=blueprint, signature=signature)
                action["blueprint"] = str(blueprint.id)
            experience = Experience.objects.create(
                run=run,
                step=doc["step"],
                epoch=epoch,
                state=doc,
                blueprints=choice.descriptors,
                fits=choice.fits,
                action=action,
                policy_version=choice.version,
                policy_name=choice.policy_name,
                behavior_logprob=0.0 if greedy else decision.logprob,
                kernel=kernel,
            )
        return experience
    except IntegrityError as exc:  # the run was deleted while deciding
        raise ApplicationError(
            f"run {run.id} no longer exists", code="not_found", status=404
        ) from exc


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


# -- policy training --------------------------------------------------------------------
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


__all__ = [
    "POLICY_NAMES",
    "catalogue_descriptors",
    "decision_distribution",
    "decision_make",
    "experience_record_outcome",
    "policy_activate",
    "policy_active",
    "policy_load",
    "policy_train_enqueue",
    "policy_version_create",
    "run_create",
    "run_update",
    "training_experiences",
]


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
