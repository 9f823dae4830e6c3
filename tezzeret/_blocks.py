"""``nn.Module`` building blocks for resolved blueprint layers (see `tezzeret.ir` for the ops).

Layout ``features`` is ``[N, D]``; layout ``channels`` is ``[N, C, H, W]`` with ``C = D``.
``layernorm`` normalises over the feature/channel dim only: for channels it is a per-pixel
LayerNorm over C (ConvNeXt's LayerNorm2d), not GroupNorm(1, C) over C, H and W.
"""

from __future__ import annotations

import torch
from torch import nn

from tezzeret._resolve import se_hidden

__all__ = ["LayerNorm2d", "Residual", "SigmoidGate", "SqueezeExcite", "build"]


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SigmoidGate(nn.Module):
    """``y = x * sigmoid(W x + b)`` with a square ``W`` (linear, or 1x1 conv for channels)."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.proj(x))


class SqueezeExcite(nn.Module):
    """Scale by ``sigmoid(fc2(relu(fc1(s))))``; ``s`` is ``x`` or, for channels, its spatial mean."""

    def __init__(self, dim: int, hidden: int, spatial: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.spatial = spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3)) if self.spatial else x
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * (s[:, :, None, None] if self.spatial else s)


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _layer(layer: dict, dim: int, layout: str) -> tuple[nn.Module, int]:
    op, channels = layer["op"], layout == "channels"
    if op == "linear":
        return nn.Linear(dim, layer["out"], bias=layer["bias"]), layer["out"]
    if op in ("conv1x1", "conv3x3"):
        k = 1 if op == "conv1x1" else 3
        return nn.Conv2d(dim, layer["out"], k, padding=k // 2, bias=layer["bias"]), layer["out"]
    if op == "depthwise3x3":
        return nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=layer["bias"]), dim
    if op == "layernorm":
        return (LayerNorm2d(dim) if channels else nn.LayerNorm(dim)), dim
    if op == "batchnorm":
        return (nn.BatchNorm2d(dim) if channels else nn.BatchNorm1d(dim)), dim
    if op == "groupnorm":
        return nn.GroupNorm(layer["groups"], dim), dim
    if op in _ACTIVATIONS:
        return _ACTIVATIONS[op](), dim
    if op == "sigmoid-gate":
        return SigmoidGate(nn.Conv2d(dim, dim, 1) if channels else nn.Linear(dim, dim)), dim
    if op == "dropout":
        return nn.Dropout(layer["p"]), dim
    if op == "squeeze-excite":
        return SqueezeExcite(dim, se_hidden(dim, layer["reduction"]), channels), dim
    if op == "residual":
        return Residual(build(layer["layers"], dim, layout)), dim
    raise ValueError(
        f"no builder for op {op!r}; validate the IR with tezzeret.ir.validate_ir first"
    )


def build(layers: list[dict], dim: int, layout: str) -> nn.Sequential:
    """Build resolved ``layers`` reading width ``dim``; ``init: zeros`` zeroes weight and bias."""
    modules = []
    for layer in layers:
        module, dim = _layer(layer, dim, layout)
        if layer.get("init") == "zeros":
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        modules.append(module)
    return nn.Sequential(*modules)
