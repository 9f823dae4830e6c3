"""Kasmina: the runtime library training code imports. No Django import anywhere under it."""

from kasmina._layer import SeedLayer
from kasmina._model import MorphableModel, wrap
from kasmina.errors import KasminaError
from kasmina.lifecycle import IllegalTransition, Stage

__all__ = ["IllegalTransition", "KasminaError", "MorphableModel", "SeedLayer", "Stage", "wrap"]
