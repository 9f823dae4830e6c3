from tamiyo import services
from tamiyo.models import PolicyVersion
from tests.support import wait_until
from tests.tamiyo._runtime import graph_doc, health_snapshot


def test_enough_new_rewards_trigger_a_real_training_job(celery_worker, catalogue, settings):
    settings.TAMIYO_TRAIN_EVERY = 34
    run = services.run_create(name="r", model_summary={}, config={})
    doc = graph_doc(health_snapshot())
    for _ in range(34):
        assert not PolicyVersion.objects.exists()
        experience = services.decision_make(run=run, graph=doc, policy_name="random")
        if experience.action["action"] == "germinate":
            outcome = {
                "final_stage": "CULLED",
                "contribution": None,
                "metric_before": 0.5,
                "metric_after": 0.5,
                "params_added": 0,
                "failures": 1,
                "rolled_back": False,
            }
        else:
            outcome = {"metric_before": 0.5, "metric_after": 0.5}
        services.experience_record_outcome(experience=experience, outcome=outcome)
    version = wait_until(
        lambda: PolicyVersion.objects.first(),
        timeout=180,
        what="the training job queued at the 34th reward",
    )
    assert version.experience_count == 34
