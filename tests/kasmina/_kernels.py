"""Kernels built locally, without a server: a small module exported with `torch.export` the
way the compile worker does (dynamic batch, and H, W for channels), put in a `KernelCache`
and loaded through a real offline `KernelLoader` (sha256 check, archive check, load)."""

from __future__ import annotations

import hashlib
import io
import uuid

import torch
from torch import nn

from kasmina.cache import CacheEntry, KernelCache
from kasmina.loader import KernelLoader


def _module(graft: str, layout: str, n_in: int, n_out: int) -> nn.Module:
    d = n_out if graft == "residual" else n_in
    if layout == "features":
        return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, n_out))
    return nn.Sequential(nn.Conv2d(d, 4, 1), nn.Tanh(), nn.Conv2d(4, n_out, 1))


def _export(module: nn.Module, graft: str, layout: str, n_in: int, n_out: int) -> bytes:
    d = n_out if graft == "residual" else n_in
    dims = {0: torch.export.Dim("batch", min=1)}
    if layout == "channels":
        dims |= {2: torch.export.Dim("height", min=1), 3: torch.export.Dim("width", min=1)}
        example = torch.randn(4, d, 6, 6)
    else:
        example = torch.randn(4, d)
    module.train()
    program = torch.export.export(module, (example,), dynamic_shapes=(dims,))
    program.example_inputs = None  # saved as a pickle otherwise (and refused on load)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


class OfflineKernels:
    """`add(graft, layout, in, out) -> kernel id`; `loader` serves them from its cache."""

    def __init__(self) -> None:
        self.cache = KernelCache()
        self.loader = KernelLoader(None, self.cache)

    def add(self, graft: str, layout: str, n_in: int, n_out: int) -> str:
        torch.manual_seed(1)
        artifact = _export(_module(graft, layout, n_in, n_out), graft, layout, n_in, n_out)
        kernel_id = str(uuid.uuid4())
        signature = {"graft": graft, "layout": layout, "in": n_in, "out": n_out}
        signature["dtype"] = "float32"
        sha = hashlib.sha256(artifact).hexdigest()
        self.cache.put(CacheEntry(kernel_id, sha, signature, artifact))
        return kernel_id

    def close(self) -> None:
        self.loader.close(timeout=5)
