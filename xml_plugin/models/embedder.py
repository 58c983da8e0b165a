"""Embedders: the per-location projection between the trunk and the pooling.

``conv1x1`` is the linear 1x1 projection of docs/methods.md ("Notation"): each of the ``n = H*W`` locations
of the trunk's feature map becomes a local feature ``f_i`` in R^d. Being linear (no bias by default),
projecting before pooling equals "GAP, then linear embedder". ``none`` keeps the trunk's channels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..registry import register


def _check_positive(name: str, value) -> int:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and int(value) == value >= 1
    if not ok:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class Conv1x1Embedder(nn.Module):
    """Linear 1x1 projection ``f_i = A x_i (+ b)``: ``[B, C, H, W] -> [B, size, H, W]``."""

    def __init__(self, in_channels: int, size: int = 128, bias: bool = False):
        super().__init__()
        self.in_channels = _check_positive("in_channels", in_channels)
        self.size = _check_positive("size", size)
        self.proj = nn.Conv2d(self.in_channels, self.size, kernel_size=1, bias=bool(bias))

    @property
    def out_channels(self) -> int:
        return self.size

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.proj(feature_map)  # [B, size, H, W]

    def linear(self):
        """``(weight [size, C], bias or None)`` of the per-location projection (poolings' ``pool_linear``)."""
        return self.proj.weight.flatten(1), self.proj.bias


class IdentityEmbedder(nn.Module):
    """No projection: the local features are the trunk's channels (``size = in_channels``)."""

    def __init__(self, in_channels: int, size: Optional[int] = None):
        super().__init__()
        self.in_channels = _check_positive("in_channels", in_channels)
        if size is not None and size != self.in_channels:
            raise ValueError(f"embedder 'none' keeps the trunk's {self.in_channels} channels: size must be "
                             f"None or {self.in_channels}, got {size!r}")
        self.size = self.in_channels

    @property
    def out_channels(self) -> int:
        return self.size

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return feature_map


register("embedder", Conv1x1Embedder, name="conv1x1", aliases=["linear"])
register("embedder", IdentityEmbedder, name="none", aliases=["identity"])

__all__ = ["Conv1x1Embedder", "IdentityEmbedder"]
