"""The golden path, served: Postgres, Redis and a real worker process.

A decision, a compile on the worker, the artifact fetched over HTTP, a graft that trains,
blends and fossilises, an experience with a reward in the database, and a policy training
job on the worker that produces a new policy version.
"""

import pytest

from kasmina import Stage
from tests.support import wait_until

pytestmark = [pytest.mark.served, pytest.mark.timeout(300)]

LIFECYCLE = ["GERMINATED", "LOADING", "TRAINING", "BLENDING", "PROBATION", "FOSSILIZED"]


def test_golden_path(make_loop, client, api_client):
    from tamiyo.models import Experience, PolicyVersion, TrainingRun
    from tamiyo.training import MIN_EXPERIENCES
    from urza.models import Kernel

    # A too-narrow hidden layer, grown by the server's active policy (the heuristic at
    # cold start); decisions come often so the run records enough experiences to train on.
    loop = make_loop(hidden=2, policy=None, decide_every=10, training_steps=20)
    controller = loop.controller
    stages: list[str] = []

    def fossilized() -> bool:
        stage = loop.stage.name
        if not stages or stages[-1] != stage:
            stages.append(stage)
        return any(r["final_stage"] == "FOSSILIZED" for r in controller.adaptations)

    loop.run_until(fossilized, timeout=180)
    row = next(r for r in controller.adaptations if r["final_stage"] == "FOSSILIZED")
    # The kept seed went through the whole lifecycle (a failed fetch retried is the same path).
    path = [s for s in stages if s not in ("ERROR_RECOVERY", "DORMANT", "CULLED", "EMBARGOED")]
    assert [s for i, s in enumerate(path) if i == 0 or path[i - 1] != s][-6:] == LIFECYCLE
    assert row["contribution"] > 0 and row["params_added"] > 0
    assert loop.in_optimizer(loop.model.seed_parameters(row["layer"], row["seed"]))

    # Compiled by the worker, fetched over HTTP and checked against its digest.
    kernel = Kernel.objects.get(pk=row["kernel"])
    assert kernel.status == "validated" and kernel.artifact_sha256
    cache = loop.model.loader.cache.stats()
    assert cache["misses"] >= 1 and cache["bytes"] > 0
    assert loop.model.layer(row["layer"]).stages[row["seed"]] is Stage.FOSSILIZED

    loop.run_until(lambda: _rewarded(row["experience"]), timeout=30)
    experience = _rewarded(row["experience"])
    assert experience.outcome["final_stage"] == "FOSSILIZED" and experience.reward is not None
    assert experience.policy_name == "heuristic" and experience.kernel_id == kernel.pk

    # Enough rewarded experiences to train on, then a training job on the worker.
    run = TrainingRun.objects.get(pk=controller.run_id)
    loop.run_until(
        lambda: Experience.objects.filter(run=run, reward__isnull=False).count() >= MIN_EXPERIENCES,
        timeout=120,
    )
    assert controller.close()
    before = PolicyVersion.objects.count()
    response = api_client.post("/api/v1/policies/train/", {"seed": 1, "epochs": 5}, format="json")
    assert response.status_code == 202, response.json()
    version = wait_until(
        lambda: (
            PolicyVersion.objects.order_by("-version").first()
            if PolicyVersion.objects.count() > before
            else None
        ),
        timeout=180,
        what="a new policy version from the training job",
    )
    assert version.experience_count >= MIN_EXPERIENCES
    assert version.metrics["heldout_score_candidate"] == version.metrics["heldout_score_candidate"]
    assert TrainingRun.objects.get(pk=run.pk).status == "finished"


def _rewarded(experience_id: str):
    from tamiyo.models import Experience

    return Experience.objects.filter(pk=experience_id, reward__isnull=False).first()
