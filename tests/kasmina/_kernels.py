"""Kernels built locally, without a server: a small module (with a non-zero output at init,
unlike the catalogue's residual kernels, so tests can see a seed act) exported by the
compile worker's own `torch.export` step, put in a `KernelCache` and loaded through a real
offline `KernelLoader` (sha256 check, archive check, load)."""

from __future__ import annotations

import hashlib
import uuid

import torch
from torch import nn

from kasmina.cache import CacheEntry, KernelCache
from kasmina.loader import KernelLoader
from tezzeret.compiler import _export
from tezzeret.ir import Signature


def _module(graft: str, layout: str, n_in: int, n_out: int) -> nn.Module:
    d = n_out if graft == "residual" else n_in
    if layout == "features":
        return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, n_out))
    return nn.Sequential(nn.Conv2d(d, 4, 1), nn.Tanh(), nn.Conv2d(4, n_out, 1))


class OfflineKernels:
    """`add(graft, layout, in, out) -> kernel id`; `loader` serves them from its cache."""

    def __init__(self) -> None:
        self.cache = KernelCache()
        self.loader = KernelLoader(None, self.cache)

    def add(self, graft: str, layout: str, n_in: int, n_out: int) -> str:
        torch.manual_seed(1)
        sig = Signature(graft, layout, n_in, n_out, "float32")
        artifact = _export(_module(graft, layout, n_in, n_out), sig)
        kernel_id = str(uuid.uuid4())
        signature = sig.to_dict()
        sha = hashlib.sha256(artifact).hexdigest()
        self.cache.put(CacheEntry(kernel_id, sha, signature, artifact))
        return kernel_id

    def close(self) -> None:
        self.loader.close(timeout=5)
