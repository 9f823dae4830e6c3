"""Graph-document builders shared by the Tamiyo tests."""

from tamiyo.graph import GRAPH_SCHEMA

__all__ = ["make_doc", "make_layer", "make_seed"]


def make_seed(index: int, stage: str = "DORMANT", **over) -> dict:
    seed = {
        "index": index,
        "stage": stage,
        "alpha": 0.0,
        "kernel_id": None,
        "graft": None,
        "latency_us": 0.0,
        "health": 0.0,
        "errors": 0,
        "steps_in_stage": 120,
        "params": 0,
    }
    return {**seed, **over}


def make_layer(name: str, kind: str = "Linear", *, stages=("DORMANT", "DORMANT"), **over) -> dict:
    layer = {
        "name": name,
        "type": kind,
        "layout": "features" if kind == "Linear" else "channels",
        "in": 16,
        "out": 32,
        "params": 544,
        "activation": {"mean": 0.1, "std": 0.9, "dead_fraction": 0.05},
        "grad_norm": 0.3,
        "seeds": [make_seed(i, stage) for i, stage in enumerate(stages)],
    }
    return {**layer, **over}


def make_doc(layers: list[dict] | None = None, **globals_over) -> dict:
    """A 3-layer, 2-seed snapshot: Linear "0", Linear "1", Conv2d "2"."""
    if layers is None:
        layers = [make_layer("0"), make_layer("1"), make_layer("2", "Conv2d")]
    g = {
        "progress": 0.3,
        "loss": 0.52,
        "loss_trend": -0.01,
        "val_metric": 0.81,
        "val_trend": 0.002,
        "budget_used": 0.1,
    }
    return {"schema": GRAPH_SCHEMA, "step": 120, "layers": layers, "globals": {**g, **globals_over}}
