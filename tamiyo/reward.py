"""The reward of one Tamiyo decision, from the outcome the runtime measured, in [-1, 1].

Metrics are higher-is-better (accuracy-like, as a fraction: 0.01 = one point); report a
loss as its negative. With the default `RewardWeights`:

GERMINATE (outcome ``final_stage, contribution, metric_before, metric_after, params_added,
failures, rolled_back``)::

    x = contribution
        − λ_params   · params_added / param_budget      (λ_params = 0.005; 0 when no budget)
        − λ_fail     · failures                           (λ_fail = 0.01 per failure)
        − λ_rollback · rolled_back                        (λ_rollback = 0.05)
    reward = tanh(scale · x)                              (scale = 20)

``contribution`` is the counterfactual gain (metric with the seed − without it); null when
the seed never reached probation, which counts as 0. So a seed worth +2 points that used
10% of the budget earns tanh(20 · (0.02 − 0.0005)) = tanh(0.39) ≈ 0.371. The budget itself
bounds growth (the server offers no kernel over what is left of it); the parameter term
only tilts the choice toward smaller kernels: spending the whole budget must buy half a
point. (At 0.05 it had to buy five, more than a too-small MLP's whole gap to one 4× wider
on digits, so a policy trained on those rewards learned to wait every time.)

WAIT (outcome ``metric_before, metric_after`` over the same window)::

    Δ = metric_after − metric_before
    x = Δ − wait_cost   if |Δ| < flat_tol   (wait_cost = 0.002, flat_tol = 0.001)
    x = Δ               otherwise
    reward = tanh(scale_wait · x)           (scale_wait = 20)

Waiting through a flat stretch costs a little, so a plateau is a reason to act; waiting
while the metric moves is judged by how it moves.

Terminal credit (`terminal_credit`, applied when a policy is trained, never stored): the
reward above is measured while the run is still training, so it can misjudge a seed whose
worth shows only later; in particular the counterfactual contribution rewards what the host
came to depend on (a residual on the output layer measured 5-11 points while runs that kept
bridges ended higher). When a run finishes, the Controller reports its final validation
metric (run metrics ``final_metric``), and each growth decision of that run is also
credited with how the run ended compared with the other finished runs of its cohort (the
same model summary and step count, decided by the same policies: comparing across policies
credits which policy ran, not what its choices did)::

    baseline = mean final_metric of the cohort's other runs      (leave-one-out)
    credit   = tanh(scale_terminal · (final_metric − baseline))  (scale_terminal = 20)
    reward'  = (1 − w) · reward + w · credit                     (w = terminal_weight = 0.5)

WAIT decisions keep their step reward: it is measured over the wait's own window, and a
run's ending spread over its dozens of waits credited the timing with whatever else set
the runs apart (the random policy's runs graft early and end low, so waiting looked good
everywhere: a policy trained that way grafted at steps 150-430 instead of 60-160). A
growth decision of a run without a final metric, or alone in its cohort, keeps its reward.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from tamiyo.graph import STAGES

__all__ = [
    "GERMINATE_OUTCOME_FIELDS",
    "TERMINAL_SCALE",
    "TERMINAL_WEIGHT",
    "RewardWeights",
    "WAIT_OUTCOME_FIELDS",
    "compute_reward",
    "terminal_credit",
]

TERMINAL_WEIGHT = 0.5
TERMINAL_SCALE = 20.0
MAX_COUNT = 2**53  # parameters added, failures: exact as floats

GERMINATE_OUTCOME_FIELDS = (
    "final_stage",
    "contribution",
    "metric_before",
    "metric_after",
    "params_added",
    "failures",
    "rolled_back",
)
WAIT_OUTCOME_FIELDS = ("metric_before", "metric_after")


@dataclass(frozen=True)
class RewardWeights:
    """Coefficients of the reward formula (see the module docstring)."""

    scale: float = 20.0
    lambda_params: float = 0.005
    lambda_fail: float = 0.01
    lambda_rollback: float = 0.05
    scale_wait: float = 20.0
    wait_cost: float = 0.002
    flat_tol: float = 0.001

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"RewardWeights.{f.name} must be finite and >= 0, got {value}")


def _number(outcome: Mapping, key: str, *, nullable: bool = False) -> float | None:
    value = outcome[key]
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
        raise ValueError(f"outcome.{key}: expected a finite number, got {_shown(value)}")
    return float(value)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def _shown(value: object) -> str:
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def _count(outcome: Mapping, key: str) -> int:
    value = outcome[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ValueError(
            f"outcome.{key}: expected an integer in [0, {MAX_COUNT}], got {_shown(value)}"
        )
    return value


def _check_fields(outcome: object, names: tuple[str, ...], action: str) -> Mapping:
    if not isinstance(outcome, Mapping):
        raise ValueError(f"outcome: expected an object, got {type(outcome).__name__}")
    for key in names:
        if key not in outcome:
            raise ValueError(
                f"outcome.{key}: missing field (a {action} outcome needs {', '.join(names)})"
            )
    for key in outcome:
        if key not in names:
            raise ValueError(
                f"outcome.{key}: unknown field for a {action} outcome; allowed: {', '.join(names)}"
            )
    return outcome


def compute_reward(
    outcome: dict,
    *,
    action: str,
    param_budget: int | None = None,
    weights: RewardWeights = RewardWeights(),
) -> float:
    """The decision's reward in [-1, 1]; errors name the offending ``outcome.<field>``."""
    if action == "wait":
        o = _check_fields(outcome, WAIT_OUTCOME_FIELDS, action)
        delta = _number(o, "metric_after") - _number(o, "metric_before")
        x = delta - weights.wait_cost if abs(delta) < weights.flat_tol else delta
        return math.tanh(weights.scale_wait * x)
    if action != "germinate":
        raise ValueError(f"action: expected 'wait' or 'germinate', got {action!r}")
    if param_budget is not None and (
        isinstance(param_budget, bool) or not isinstance(param_budget, int) or param_budget <= 0
    ):
        raise ValueError(f"param_budget: expected a positive integer or None, got {param_budget!r}")
    o = _check_fields(outcome, GERMINATE_OUTCOME_FIELDS, action)
    if o["final_stage"] not in STAGES:
        raise ValueError(
            f"outcome.final_stage: expected one of {', '.join(STAGES)}, got {o['final_stage']!r}"
        )
    if not isinstance(o["rolled_back"], bool):
        raise ValueError(f"outcome.rolled_back: expected true or false, got {o['rolled_back']!r}")
    _number(o, "metric_before")
    _number(o, "metric_after")
    contribution = _number(o, "contribution", nullable=True) or 0.0
    params = _count(o, "params_added")
    x = (
        contribution
        - (weights.lambda_params * params / param_budget if param_budget else 0.0)
        - weights.lambda_fail * _count(o, "failures")
        - weights.lambda_rollback * float(o["rolled_back"])
    )
    return math.tanh(weights.scale * x)


def _finite_or_none(value: object, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number or null, got {value!r}")
    return float(value)


def terminal_credit(
    experiences: Sequence[Mapping],
    *,
    weight: float = TERMINAL_WEIGHT,
    scale: float = TERMINAL_SCALE,
) -> tuple[list[dict], dict]:
    """Blend each rewarded germinate experience's reward with its run's terminal credit (see
    the module docstring). Experiences carry ``run`` (id), ``cohort`` (key) and
    ``final_metric`` (the run's, or null); any of them missing or null leaves the reward as
    it is, and so does a WAIT action.

    Returns new experience dicts (the input is not modified) and a summary:
    ``{"weight", "credited", "runs", "cohorts"}`` (experiences credited, runs and cohorts
    that took part)."""
    if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
        raise ValueError(f"terminal weight must be in [0, 1], got {weight}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"terminal scale must be finite and > 0, got {scale}")
    finals: dict[object, dict[object, float]] = {}
    for i, exp in enumerate(experiences):
        final = _finite_or_none(exp.get("final_metric"), f"experiences[{i}].final_metric")
        run, cohort = exp.get("run"), exp.get("cohort")
        if final is None or run is None or cohort is None:
            continue
        seen = finals.setdefault(cohort, {}).setdefault(run, final)
        if seen != final:
            raise ValueError(
                f"experiences[{i}].final_metric: run {run!r} has two final metrics "
                f"({seen} and {final})"
            )
    out, credited, runs = [], 0, set()
    for exp in experiences:
        exp = dict(exp)
        others = finals.get(exp.get("cohort"), {})
        run = exp.get("run")
        reward = exp.get("reward")
        numeric = isinstance(reward, int | float) and not isinstance(reward, bool)
        action = exp.get("action")
        grew = isinstance(action, Mapping) and action.get("action") == "germinate"
        if (
            grew
            and numeric
            and math.isfinite(reward)
            and run in others
            and len(others) > 1
            and weight > 0
        ):
            baseline = (sum(others.values()) - others[run]) / (len(others) - 1)
            credit = math.tanh(scale * (others[run] - baseline))
            exp["reward"] = (1.0 - weight) * float(reward) + weight * credit
            credited += 1
            runs.add((exp["cohort"], run))
        out.append(exp)
    cohorts = {cohort for cohort, _ in runs}
    return out, {"weight": weight, "credited": credited, "runs": len(runs), "cohorts": len(cohorts)}
