"""Prototype seeding shared by the poolings: farthest-point (k-center) selection."""
from __future__ import annotations

import torch


def farthest_point_indices(points: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """k-center selection: indices [k] into ``points`` [N, d], starting at ``first``, then repeatedly the point
    farthest from those chosen (ties: lowest index; with fewer distinct points than ``k`` some repeat)."""
    if points.dim() != 2 or points.shape[0] < 1:
        raise ValueError(f"k-center needs points [N, d] with N >= 1, got {tuple(points.shape)}")
    pts = points.float()
    chosen = [int(first)]
    nearest = (pts - pts[first]).pow(2).sum(dim=1)  # [N] squared distance to the chosen set
    for _ in range(1, k):
        nxt = int(nearest.argmax())
        chosen.append(nxt)
        nearest = torch.minimum(nearest, (pts - pts[nxt]).pow(2).sum(dim=1))
    return torch.tensor(chosen, dtype=torch.long, device=points.device)
