"""Decision writes: draw an action from the deciding policy and record it as an experience
(requesting the kernel of a germinate decision)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
from django.db import IntegrityError, transaction

from tamiyo.feasibility import (
    CatalogueEntry,
    budget_left,
    catalogue_fits,
    layer_inputs,
    site_signature,
)
from tamiyo.graph import GraphError, to_data, validate_graph
from tamiyo.models import Experience, PolicyVersion, TrainingRun
from tamiyo.policy import ActionDistribution, HeuristicPolicy, create_policy
from tamiyo.selectors import catalogue_descriptors
from tamiyo.services.policies import policy_active
from urza import services as urza_services
from urza.errors import ApplicationError
from urza.models import Blueprint

__all__ = ["POLICY_NAMES", "Choice", "decision_distribution", "decision_make", "feasibility"]

logger = logging.getLogger(__name__)

POLICY_NAMES = ("gnn", "heuristic", "random")


def feasibility(
    *, doc: dict, blueprints: list[Blueprint], dtype: str, budget: float = math.inf
) -> tuple[list[list[bool]], list[int | None]]:
    """`tamiyo.feasibility.catalogue_fits` for a validated graph and the catalogue's rows:
    which (seed site, blueprint) pairs the compiler accepts within `budget` parameters, and
    each blueprint's mean kernel size (the descriptors' ``params_estimate``)."""
    catalogue = [CatalogueEntry(b.ir_sha256, b.ir) for b in blueprints]
    return catalogue_fits(layers=doc["layers"], catalogue=catalogue, dtype=dtype, budget=budget)


def _rng() -> torch.Generator:
    """A fresh sampling seed per decision (its log-probability is what is recorded)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


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
    budget = budget_left(
        param_budget=(run.config or {}).get("param_budget"),
        budget_used=doc["globals"]["budget_used"],
    )
    fits, estimates = feasibility(doc=doc, blueprints=blueprints, dtype=dtype, budget=budget)
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
                signature = site_signature(
                    layer, blueprint.ir["graft"], layer_inputs(doc["layers"]), dtype
                )
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
