import pytest

from tamiyo import services
from tests.tamiyo._runtime import graph_doc, health_snapshot
from urza.errors import ApplicationError


@pytest.mark.django_db
def test_a_graph_with_nan_features_is_refused_by_the_decision_service(catalogue):
    run = services.run_create(name="r", model_summary={}, config={})
    doc = graph_doc(health_snapshot())
    doc["layers"][0]["activation"]["std"] = float("nan")
    with pytest.raises(ApplicationError) as info:
        services.decision_make(run=run, graph=doc)
    assert info.value.status == 400
    assert "graph.layers[0].activation.std" in info.value.detail
    assert not run.experiences.exists()
