import copy

import pytest

RESIDUAL_MLP_IR = {
    "schema": "esper.blueprint/1",
    "name": "test-residual-mlp",
    "graft": "residual",
    "layout": "features",
    "params": {"r": "D/4"},
    "layers": [
        {"op": "linear", "out": "r"},
        {"op": "gelu"},
        {"op": "linear", "out": "D", "init": "zeros"},
    ],
}
SIGNATURE = {"graft": "residual", "layout": "features", "in": 32, "out": 32, "dtype": "float32"}


@pytest.fixture
def ir():
    return copy.deepcopy(RESIDUAL_MLP_IR)


@pytest.fixture
def signature():
    return dict(SIGNATURE)


@pytest.fixture
def blueprint(db, ir):
    from urza.services import blueprint_create

    return blueprint_create(name="test-residual-mlp", version=1, ir=ir, tags=["mlp", "test"])
