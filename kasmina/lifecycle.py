"""The seed lifecycle: stages, the legal transitions between them, and α schedules.

```
DORMANT → GERMINATED → LOADING → TRAINING → BLENDING → PROBATION → FOSSILIZED
                          │          │          │           └──────→ CULLED → EMBARGOED → DORMANT
                          └──────────┴──────────┴→ ERROR_RECOVERY ─┘
```

ERROR_RECOVERY goes back to LOADING for a retry, or on to CULLED once the circuit breaker
opens. A seed can be culled from any stage where it holds (or awaits) a kernel: a kernel
the compiler rejected, a manual `unload_kernel`, or a failed probation.
"""

from __future__ import annotations

import math
from enum import IntEnum

__all__ = [
    "ACTIVE_STAGES",
    "GRAFTED_STAGES",
    "IllegalTransition",
    "Stage",
    "TRANSITIONS",
    "alpha_schedule",
    "check_transition",
]


class Stage(IntEnum):
    DORMANT = 0
    GERMINATED = 1
    LOADING = 2
    TRAINING = 3
    BLENDING = 4
    PROBATION = 5
    FOSSILIZED = 6
    CULLED = 7
    EMBARGOED = 8
    ERROR_RECOVERY = 9


TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.DORMANT: frozenset({Stage.GERMINATED}),
    Stage.GERMINATED: frozenset({Stage.LOADING, Stage.CULLED}),
    Stage.LOADING: frozenset({Stage.TRAINING, Stage.ERROR_RECOVERY, Stage.CULLED}),
    Stage.TRAINING: frozenset({Stage.BLENDING, Stage.ERROR_RECOVERY, Stage.CULLED}),
    Stage.BLENDING: frozenset({Stage.PROBATION, Stage.ERROR_RECOVERY, Stage.CULLED}),
    Stage.PROBATION: frozenset({Stage.FOSSILIZED, Stage.ERROR_RECOVERY, Stage.CULLED}),
    Stage.FOSSILIZED: frozenset({Stage.CULLED}),
    Stage.CULLED: frozenset({Stage.EMBARGOED}),
    Stage.EMBARGOED: frozenset({Stage.DORMANT}),
    Stage.ERROR_RECOVERY: frozenset({Stage.LOADING, Stage.CULLED}),
}

#: Stages whose seed module runs in the forward pass.
GRAFTED_STAGES = frozenset({Stage.TRAINING, Stage.BLENDING, Stage.PROBATION, Stage.FOSSILIZED})
#: Stages in which a seed is occupied (not available for a new germination).
ACTIVE_STAGES = frozenset(Stage) - {Stage.DORMANT}


class IllegalTransition(ValueError):
    """A lifecycle move the state machine does not allow."""


def check_transition(current: Stage, target: Stage, *, where: str = "seed") -> None:
    if target not in TRANSITIONS[current]:
        allowed = ", ".join(s.name for s in sorted(TRANSITIONS[current])) or "none"
        raise IllegalTransition(
            f"{where}: cannot go from {current.name} to {target.name}; "
            f"from {current.name} it may go to {allowed}"
        )


def alpha_schedule(step: int, total: int, kind: str = "linear") -> float:
    """α after `step` of `total` blending steps: 0 at the start, 1 at the end."""
    if total <= 0:
        return 1.0
    t = min(max(step / total, 0.0), 1.0)
    if kind == "linear":
        return t
    if kind == "cosine":
        return 0.5 - 0.5 * math.cos(math.pi * t)
    raise ValueError(f"unknown blend schedule {kind!r}; use 'linear' or 'cosine'")
