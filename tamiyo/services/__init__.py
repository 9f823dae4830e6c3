"""Tamiyo's writes: runs, decisions (with the active policy), outcomes and policy versions.

Reads are `tamiyo.selectors` (the two it serves, `catalogue_descriptors` and
`training_experiences`, are re-exported here for callers of the old single module); the
feasibility arithmetic is `tamiyo.feasibility`.
"""

__all__ = [
    "POLICY_NAMES",
    "Choice",
    "TrainingDiverged",
    "catalogue_descriptors",
    "decision_distribution",
    "decision_make",
    "experience_record_outcome",
    "policy_activate",
    "policy_active",
    "policy_load",
    "policy_train",
    "policy_train_enqueue",
    "policy_version_create",
    "run_create",
    "run_update",
    "training_experiences",
]

from tamiyo.selectors import catalogue_descriptors, training_experiences
from tamiyo.services.decisions import POLICY_NAMES, Choice, decision_distribution, decision_make
from tamiyo.services.outcomes import experience_record_outcome
from tamiyo.services.policies import (
    TrainingDiverged,
    policy_activate,
    policy_active,
    policy_load,
    policy_train,
    policy_train_enqueue,
    policy_version_create,
)
from tamiyo.services.runs import run_create, run_update
