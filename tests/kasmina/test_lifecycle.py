import pytest

from kasmina.lifecycle import (
    TRANSITIONS,
    IllegalTransition,
    Stage,
    alpha_schedule,
    check_transition,
)

pytestmark = pytest.mark.fast


def test_the_golden_path_is_legal():
    path = [
        Stage.DORMANT,
        Stage.GERMINATED,
        Stage.LOADING,
        Stage.TRAINING,
        Stage.BLENDING,
        Stage.PROBATION,
        Stage.FOSSILIZED,
    ]
    for a, b in zip(path, path[1:], strict=False):
        check_transition(a, b)


def test_the_cull_cycle_returns_to_dormant():
    for a, b in [
        (Stage.PROBATION, Stage.CULLED),
        (Stage.CULLED, Stage.EMBARGOED),
        (Stage.EMBARGOED, Stage.DORMANT),
    ]:
        check_transition(a, b)


@pytest.mark.parametrize("stage", [Stage.LOADING, Stage.TRAINING, Stage.BLENDING])
def test_failures_go_to_error_recovery_which_retries_or_culls(stage):
    check_transition(stage, Stage.ERROR_RECOVERY)
    check_transition(Stage.ERROR_RECOVERY, Stage.LOADING)
    check_transition(Stage.ERROR_RECOVERY, Stage.CULLED)


@pytest.mark.parametrize(
    "current, target",
    [
        (Stage.DORMANT, Stage.TRAINING),
        (Stage.FOSSILIZED, Stage.DORMANT),
        (Stage.CULLED, Stage.DORMANT),
        (Stage.TRAINING, Stage.FOSSILIZED),
        (Stage.EMBARGOED, Stage.GERMINATED),
    ],
)
def test_illegal_transitions_raise_and_say_what_is_allowed(current, target):
    with pytest.raises(IllegalTransition, match=f"from {current.name} it may go to"):
        check_transition(current, target)


def test_every_stage_has_a_way_out_except_none():
    assert set(TRANSITIONS) == set(Stage)
    assert all(TRANSITIONS[s] for s in Stage)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_ramps_from_zero_to_one_monotonically(kind):
    values = [alpha_schedule(i, 20, kind) for i in range(21)]
    assert values[0] == 0.0 and values[-1] == 1.0
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert alpha_schedule(10, 20, "linear") == 0.5
    assert alpha_schedule(5, 20, "cosine") == pytest.approx(0.5 - 0.5 * 0.7071067811865476)


def test_unknown_schedule_is_a_value_error():
    with pytest.raises(ValueError, match="linear"):
        alpha_schedule(1, 2, "exponential")
