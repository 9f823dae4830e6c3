"""Kasmina: the runtime library training code imports. No Django import anywhere under it.

from kasmina import EsperClient, wrap

model = wrap(model, client=EsperClient())  # ESPER_URL / ESPER_TOKEN from the environment
"""

from kasmina._layer import SeedLayer
from kasmina._model import MorphableModel, wrap
from kasmina.cache import KernelCache
from kasmina.client import EsperClient
from kasmina.errors import KasminaError
from kasmina.lifecycle import IllegalTransition, Stage
from kasmina.loader import KernelLoader

__all__ = [
    "EsperClient",
    "IllegalTransition",
    "KasminaError",
    "KernelCache",
    "KernelLoader",
    "MorphableModel",
    "SeedLayer",
    "Stage",
    "wrap",
]
