"""`tamiyo.feasibility`: which blueprints fit which seed site, from explicit inputs only."""

import math
import subprocess
import sys

from tamiyo.feasibility import CatalogueEntry, budget_left, catalogue_fits, site_signature
from tezzeret.catalogue import CATALOGUE
from tezzeret.ir import ir_sha256, validate_ir


def _layer(name, n_in, n_out, bridge_from=None, seeds=1):
    return {
        "name": name,
        "layout": "features",
        "in": n_in,
        "out": n_out,
        "bridge_from": bridge_from,
        "seeds": [{}] * seeds,
    }


def _entries():
    irs = [validate_ir(entry["ir"]) for entry in CATALOGUE if entry["ir"]["layout"] == "features"]
    return [CatalogueEntry(ir_sha256(ir), ir) for ir in irs]


def test_a_bridge_fits_only_a_layer_with_a_bridge_source_and_rows_repeat_per_seed():
    layers = [_layer("a", 16, 32, seeds=2), _layer("b", 32, 10, bridge_from="a")]
    entries = _entries()
    fits, estimates = catalogue_fits(layers=layers, catalogue=entries, dtype="float32")
    assert len(fits) == 3 and fits[0] == fits[1]
    bridges = [k for k, e in enumerate(entries) if e.graft == "bridge"]
    assert bridges and not any(fits[0][k] for k in bridges) and all(fits[2][k] for k in bridges)
    assert all(e is None or e > 0 for e in estimates)


def test_a_budget_keeps_out_the_kernels_larger_than_it():
    layers = [_layer("a", 64, 64)]
    entries = _entries()
    _, estimates = catalogue_fits(layers=layers, catalogue=entries, dtype="float32")
    smallest = min(e for e in estimates if e is not None)
    fits, _ = catalogue_fits(layers=layers, catalogue=entries, dtype="float32", budget=smallest)
    assert fits[0] == [e == smallest for e in estimates]


def test_the_budget_left_is_the_unused_share_of_a_positive_integer_budget():
    assert budget_left(param_budget=1000, budget_used=0.25) == 750
    assert budget_left(param_budget=1000, budget_used=2.0) == 0
    for none in (None, True, 0, -5, 1.5, 2**63):
        assert budget_left(param_budget=none, budget_used=0.0) == math.inf


def test_a_bridge_signature_reads_its_source_layers_input():
    inputs = {"a": 16, "b": 32}
    layer = _layer("b", 32, 10, bridge_from="a")
    assert site_signature(layer, "bridge", inputs, "float16") == {
        "graft": "bridge",
        "layout": "features",
        "in": 16,
        "out": 10,
        "dtype": "float16",
    }
    assert site_signature(_layer("a", 16, 32), "bridge", inputs, "float32") is None


def test_feasibility_imports_no_django():
    code = "import sys, tamiyo.feasibility; assert not any(m.startswith('django') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
