"""Pooling interface and the plain poolings (GAP, GMP).

Every pooling takes a projected feature map ``[B, d, H, W]`` and returns a :class:`PoolingOutput`:
the global embedding ``[B, d]`` and, for poolings that have one, the ``histogram`` ``[B, m]`` (rows in
the simplex: XML's prototype assignments, GSP's attributes). Cross-batch wrappers read the histogram.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from ..registry import register


class PoolingOutput(NamedTuple):
    embedding: torch.Tensor  # [B, d]
    histogram: Optional[torch.Tensor] = None  # [B, m], rows in the simplex


class Pooling(nn.Module):
    """Base class: ``forward(feature_map [B, d, H, W]) -> PoolingOutput``.

    ``gives_histogram`` tells the trainer (at start-up) whether a histogram wrapper can be used.
    """

    gives_histogram = False

    def __init__(self, dim: int):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"pooling dim must be >= 1, got {dim}")
        self.dim = int(dim)

    def pool_linear(self, trunk_map: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor] = None) -> Optional[PoolingOutput]:
        """The pooling of the linear projection ``f_i = weight x_i + bias`` of ``trunk_map`` [B, C, H, W]
        (``weight`` [d, C]), computed without projecting every location when that is cheaper; None: no shortcut
        (the caller projects, then calls ``forward``). Equal to ``forward`` up to float rounding."""
        return None


@register("pooling", name="gap")
class GlobalAveragePooling(Pooling):
    """GAP: ``z = (1/n) sum_i f_i`` over the ``n = H*W`` locations."""

    def forward(self, feature_map: torch.Tensor) -> PoolingOutput:
        return PoolingOutput(feature_map.mean(dim=(2, 3)))

    def pool_linear(self, trunk_map, weight, bias=None):
        """GAP commutes with a linear projection: project the mean, not the ``n`` locations (``n`` times fewer
        multiply-adds, forward and backward)."""
        return PoolingOutput(nn.functional.linear(trunk_map.mean(dim=(2, 3)), weight, bias))


@register("pooling", name="gmp")
class GlobalMaxPooling(Pooling):
    """GMP: per-channel maximum over locations."""

    def forward(self, feature_map: torch.Tensor) -> PoolingOutput:
        return PoolingOutput(feature_map.amax(dim=(2, 3)))
