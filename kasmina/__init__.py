"""Kasmina: the runtime library training code imports. No Django import anywhere under it.

from kasmina import EsperClient, wrap

client = EsperClient()  # ESPER_URL / ESPER_TOKEN from the environment
model = wrap(model, client=client)
controller = Controller(model, optimizer, client, total_steps=...)  # then controller.step(loss)
"""

from kasmina._layer import SeedLayer
from kasmina._model import MorphableModel, wrap
from kasmina.cache import KernelCache
from kasmina.client import EsperClient
from kasmina.controller import Controller
from kasmina.errors import KasminaError
from kasmina.lifecycle import IllegalTransition, Stage
from kasmina.loader import KernelLoader

__all__ = [
    "Controller",
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
