"""Which blueprints fit which seed site, under the run's parameter budget.

Pure arithmetic fed explicitly (no Django, no database): a decision checks every
(seed site, blueprint) pair, so nothing here may query per pair. Kernel sizes come from the
blueprint IR (`tezzeret.ir.param_count`), remembered per (IR, site signature).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from tezzeret.ir import param_count, parse_signature
from tezzeret.signature import graft_dims

__all__ = [
    "CatalogueEntry",
    "budget_left",
    "catalogue_fits",
    "kernel_params",
    "layer_inputs",
    "site_dims",
    "site_signature",
]


@dataclass(frozen=True)
class CatalogueEntry:
    """A blueprint as feasibility sees it. Equal (and hashed) by ``ir_sha256`` alone, which
    fixes its IR, so an entry can key a cache while it carries the IR itself."""

    ir_sha256: str
    ir: dict = field(compare=False, repr=False)

    @property
    def graft(self) -> str:
        return self.ir["graft"]


def budget_left(*, param_budget: object, budget_used: float) -> float:
    """Parameters a run may still add: ``param_budget`` × (1 − budget_used); inf if none."""
    if (
        not isinstance(param_budget, int)
        or isinstance(param_budget, bool)
        or not 0 < param_budget < 2**63
    ):
        return math.inf  # none, or beyond anything a model holds
    return param_budget * max(0.0, 1.0 - float(budget_used))


def layer_inputs(layers: Sequence[dict]) -> dict[str, int]:
    """Each layer's input width, by name (what a bridge seed of its consumer reads)."""
    return {layer["name"]: layer["in"] for layer in layers}


def site_dims(layer: dict, graft: str, inputs: dict[str, int]) -> tuple[int, int] | None:
    """(in, out) widths a `graft` seed of graph `layer` reads and writes; None where it
    cannot live. ``inputs``: `layer_inputs` of the graph."""
    source = layer.get("bridge_from")  # a validated graph has it; only bridges read it
    return graft_dims(graft, layer["in"], layer["out"], None if source is None else inputs[source])


def site_signature(layer: dict, graft: str, inputs: dict[str, int], dtype: str) -> dict | None:
    """The kernel signature a `graft` seed of `layer` is compiled for (None: it cannot live
    there)."""
    dims = site_dims(layer, graft, inputs)
    if dims is None:
        return None
    return {
        "graft": graft,
        "layout": layer["layout"],
        "in": dims[0],
        "out": dims[1],
        "dtype": dtype,
    }


@lru_cache(maxsize=8192)
def kernel_params(
    entry: CatalogueEntry, layout: str, n_in: int, n_out: int, dtype: str
) -> int | None:
    """Parameters of that blueprint's kernel for the site, or None if it does not fit."""
    signature = {"graft": entry.graft, "layout": layout, "in": n_in, "out": n_out, "dtype": dtype}
    try:
        return param_count(entry.ir, parse_signature(signature))
    except ValueError:  # IRError: the blueprint does not fit that signature
        return None


def catalogue_fits(
    *,
    layers: Sequence[dict],
    catalogue: Sequence[CatalogueEntry],
    dtype: str,
    budget: float = math.inf,
) -> tuple[list[list[bool]], list[int | None]]:
    """(fits, estimates). ``fits``: one row per seed site (graph order), one column per
    catalogue entry: whether the compiler accepts that blueprint for the layer's dims and
    its kernel fits in `budget` parameters. ``estimates``: each entry's mean kernel size over
    the layers it compiles for (None where it compiles for none)."""
    rows: list[list[bool]] = []
    sizes: list[list[int]] = [[] for _ in catalogue]
    inputs = layer_inputs(layers)
    for layer in layers:
        row = []
        for k, entry in enumerate(catalogue):
            sig = site_signature(layer, entry.graft, inputs, dtype)
            params = (
                None
                if sig is None
                else kernel_params(entry, sig["layout"], sig["in"], sig["out"], dtype)
            )
            if params is not None:
                sizes[k].append(params)
            row.append(params is not None and params <= budget)
        rows.extend([row] * len(layer["seeds"]))
    return rows, [round(sum(s) / len(s)) if s else None for s in sizes]
