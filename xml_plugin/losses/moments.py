"""Pure math of cross-batch normalization (docs/methods.md, XBN): moments, moment matching, Kalman/EMA filter.

No state and no modules here: :mod:`xml_plugin.losses.xbn` keeps the state and calls these.
"""
from __future__ import annotations

from typing import Tuple

import torch


def batch_moments(x: torch.Tensor, population_std: bool = True, std_eps: float = 1e-6,
                  dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the rows of ``x`` [N, d] -> ([d], [d]), computed in ``dtype``.

    ``population_std``: divide by N (True) or N - 1 (False). The std is clamped from below by ``std_eps``.
    """
    if x.dim() != 2:
        raise ValueError(f"batch_moments expects a 2-D tensor [N, d], got shape {tuple(x.shape)}")
    if x.shape[0] < (1 if population_std else 2):
        raise ValueError(f"batch_moments needs at least {1 if population_std else 2} rows, got {x.shape[0]}")
    x = x.detach().to(dtype)
    mean = x.mean(dim=0)  # [d]
    std = x.std(dim=0, unbiased=not population_std).clamp_min(std_eps)  # [d]
    return mean, std


def match_moments(x: torch.Tensor, mean_src: torch.Tensor, std_src: torch.Tensor,
                  mean_tgt: torch.Tensor, std_tgt: torch.Tensor) -> torch.Tensor:
    """XBN's moment matching, per dimension: ``(x - mean_src) / std_src * std_tgt + mean_tgt``.

    ``x`` [N, d]; the four statistics [d]. Computed in the statistics' dtype; returned in that dtype.
    """
    x = x.to(mean_src.dtype)
    return (x - mean_src) / std_src * std_tgt + mean_tgt  # [N, d]


def kalman_predict(p: torch.Tensor, q: float) -> torch.Tensor:
    """AXBN's prediction step: the process noise ``q`` is added to the error variance, ``p <- p + q``."""
    return p + q


def kalman_measure(p: torch.Tensor, r: float, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """AXBN's measurement step with a batch of ``batch_size`` rows (measurement noise ``r / batch_size``):
    ``K = p / (p + r / batch_size)``, ``p <- (1 - K) p``. Returns ``(K, p_new)``.

    Without a prediction in between, repeated measurements give ``K ~ 1/k``: the estimate becomes the running mean
    of the measurements. ``r = 0`` gives ``K = 1`` exactly (then AXBN equals XBN).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if r == 0:  # an exact measurement: K = 1 (also when p has reached 0, where p / p is undefined)
        return torch.ones_like(p), torch.zeros_like(p)
    gain = p / (p + r / batch_size)
    return gain, (1 - gain) * p


def kalman_gain(p: torch.Tensor, q: float, r: float, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A prediction then a measurement (:func:`kalman_predict`, :func:`kalman_measure`): ``p_pred = p + q;
    K = p_pred / (p_pred + r / batch_size); p_new = (1 - K) p_pred``. Returns ``(K, p_new)``."""
    return kalman_measure(kalman_predict(p, q), r, batch_size)


def filter_moments(mean_hat: torch.Tensor, std_hat: torch.Tensor, mean_batch: torch.Tensor,
                   std_batch: torch.Tensor, gain) -> Tuple[torch.Tensor, torch.Tensor]:
    """Measurement update of the moment estimates with gain ``K`` (Kalman or constant EMA):
    ``mean_hat += K (mean_batch - mean_hat)``, same for ``std_hat``.

    Written as the convex combination ``(1 - K) hat + K batch`` (the same value), so that ``K = 1``
    returns the batch moments bit for bit.
    """
    new_mean = (1 - gain) * mean_hat + gain * mean_batch
    new_std = (1 - gain) * std_hat + gain * std_batch
    return new_mean, new_std


__all__ = ["batch_moments", "match_moments", "kalman_predict", "kalman_measure", "kalman_gain", "filter_moments"]
