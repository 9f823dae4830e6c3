"""The host a kernel is compiled for: `Signature`, its vocabularies, and how a graft sizes it.

Pure, no torch: the server (tamiyo's feasibility, urza's kernel requests) and the compiler
read the same facts from here. The runtime (kasmina, which imports no server code) keeps its
own `SeedLayer.graft_dims` and dtype names; tests check that they agree with these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tezzeret._expr import IRError, check_keys, is_one_of

__all__ = [
    "DTYPES",
    "GRAFTS",
    "LAYOUTS",
    "MAX_DIM",
    "Signature",
    "graft_dims",
    "parse_signature",
]

GRAFTS = frozenset({"residual", "parallel", "bridge"})
LAYOUTS = frozenset({"features", "channels"})
# The floating dtypes a kernel is compiled for, by torch's name (``torch.<name>``).
DTYPES = ("float32", "float64", "bfloat16", "float16")
MAX_DIM = 65536


def graft_dims(
    graft: str, layer_in: int, layer_out: int, bridge_in: int | None
) -> tuple[int, int] | None:
    """(in, out) of the signature a `graft` seed of a host layer is compiled for: the layer's
    own widths, except that a bridge seed reads the input of the layer's bridge source
    (``bridge_in``; None where the layer has none, and then no bridge seed lives there)."""
    if not is_one_of(graft, GRAFTS):
        raise IRError("graft", f"must be one of {', '.join(sorted(GRAFTS))}, got {graft!r}")
    if graft != "bridge":
        return layer_in, layer_out
    return None if bridge_in is None else (bridge_in, layer_out)


@dataclass(frozen=True)
class Signature:
    """The host a kernel is compiled for; ``in_`` is spelt ``in`` in JSON."""

    graft: str
    layout: str
    in_: int
    out: int
    dtype: str

    def __post_init__(self) -> None:
        if not is_one_of(self.graft, GRAFTS):
            raise IRError(
                "signature.graft", f"must be one of {', '.join(sorted(GRAFTS))}, got {self.graft!r}"
            )
        if not is_one_of(self.layout, LAYOUTS):
            raise IRError(
                "signature.layout",
                f"must be one of {', '.join(sorted(LAYOUTS))}, got {self.layout!r}",
            )
        for key, value in (("in", self.in_), ("out", self.out)):
            if type(value) is not int or not 1 <= value <= MAX_DIM:
                raise IRError(
                    f"signature.{key}", f"must be an integer in [1, {MAX_DIM}], got {value!r}"
                )
        if not is_one_of(self.dtype, DTYPES):
            raise IRError(
                "signature.dtype", f"must be one of {', '.join(sorted(DTYPES))}, got {self.dtype!r}"
            )

    @property
    def width(self) -> int:
        """``D``, the width the seed reads: ``OUT`` for a residual graft (it reads the host's
        output), ``IN`` otherwise."""
        return self.out if self.graft == "residual" else self.in_

    def to_dict(self) -> dict[str, Any]:
        return {
            "graft": self.graft,
            "layout": self.layout,
            "in": self.in_,
            "out": self.out,
            "dtype": self.dtype,
        }


def parse_signature(data: object) -> Signature:
    if isinstance(data, Signature):
        return data
    if not isinstance(data, dict):
        raise IRError(
            "signature",
            f"must be an object with keys graft, layout, in, out, dtype; got {type(data).__name__}",
        )
    keys = ("graft", "layout", "in", "out", "dtype")
    check_keys(data, keys, "signature")
    for key in keys:
        if key not in data:
            raise IRError(f"signature.{key}", "required")
    return Signature(data["graft"], data["layout"], data["in"], data["out"], data["dtype"])
