"""Snapshots of a MorphableModel and its optimizer, for the Controller's rollback.

Tensors are keyed by identity, not by name: a graft adds parameters and a cull removes
them, so names shift while the tensors that existed at the snapshot keep their identity.
A snapshot holds a reference to every tensor it saved, so an id cannot be reused.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch

from kasmina._model import MorphableModel


@dataclass
class Snapshot:
    """Parameters, buffers and optimizer state at `step`, plus the caller's `extra` state."""

    step: int
    tensors: dict[int, tuple[torch.Tensor, torch.Tensor]]
    optim: dict[int, dict]
    extra: dict = field(default_factory=dict)

    @classmethod
    def take(
        cls, model: MorphableModel, optimizer: torch.optim.Optimizer, step: int, **extra
    ) -> Snapshot:
        # The seed layers' lifecycle buffers are bookkeeping, not state to roll back.
        bookkeeping = {
            id(b) for layer in model.seed_layers.values() for b in layer.buffers(recurse=False)
        }
        tensors = {
            id(t): (t, t.detach().clone())
            for t in itertools.chain(model.parameters(), model.buffers())
            if id(t) not in bookkeeping
        }
        optim = {
            id(p): copy.deepcopy(optimizer.state[p])
            for group in optimizer.param_groups
            for p in group["params"]
            if p in optimizer.state
        }
        return cls(step, tensors, optim, extra)

    def holds(self, params) -> bool:
        """Whether every tensor in `params` existed when the snapshot was taken."""
        return all(id(p) in self.tensors for p in params)

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        """Copy the saved values back in place; optimizer state of newer parameters is dropped."""
        with torch.no_grad():
            for live, saved in self.tensors.values():
                live.copy_(saved)
        for group in optimizer.param_groups:
            for p in group["params"]:
                saved = self.optim.get(id(p))
                if saved is None:
                    optimizer.state.pop(p, None)
                else:
                    optimizer.state[p] = copy.deepcopy(saved)
