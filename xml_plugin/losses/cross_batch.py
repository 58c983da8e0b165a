"""XML's cross-batch loss wrapper (docs/methods.md, XML: "cross-batch loss").

``L = L(Z, y) + lam * L_xml`` with ``L_xml = L(Zhat_B, y_B) + L(Zhat_A, y_A)``: the batch is split by class
into two class-disjoint halves A and B; prototypes fitted in closed form to one half (ridge regression from
its histograms to its embeddings) reconstruct the other half's embeddings from its histograms, and the base
loss is applied to these reconstructions. Drop-in like PML's ``CrossBatchMemory``: any PML loss, optional miner.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..registry import register
from .ridge import ridge_fit_predict


def class_halves(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split a batch by class: boolean masks (A, B) over [B] samples.

    The batch's sorted unique labels: the first ``floor(C/2)`` go to A, the rest (``ceil(C/2)``) to B.
    """
    classes = torch.unique(labels, sorted=True)
    in_a = torch.isin(labels, classes[: len(classes) // 2])
    return in_a, ~in_a


@register("loss_wrapper", name="xml")
class CrossBatchMetricLoss(nn.Module):
    """Base loss plus XML's cross-batch regulariser: ``L(Z, y) + lam * (L(Zhat_B, y_B) + L(Zhat_A, y_A))``.

    ``Zhat_B = H_B W_A`` with ``W_A`` the ridge fit (``ridge``) of ``Z_A`` on ``H_A`` (shared routine
    :func:`~xml_plugin.losses.ridge.ridge_fit_predict`); gradients flow through ``Z`` (and ``H`` if it has any).
    The regulariser is skipped (base loss only) when ``lam == 0``, ``histograms`` is None, the batch has fewer
    than 2 classes, or a half has fewer than 2 samples. With a ``miner``, the base batch (unless an
    ``indices_tuple`` is given) and each reconstruction are mined separately.
    ``last_base_loss`` and ``last_xml_loss`` hold the last call's components as floats, for logging.
    """

    needs_histograms = True

    def __init__(self, loss: nn.Module, lam: float = 1.0, ridge: float = 1e-3, miner: Optional[nn.Module] = None):
        super().__init__()
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge!r}")
        self.loss = loss
        self.miner = miner
        self.lam = float(lam)
        self.ridge = float(ridge)
        self.last_base_loss = 0.0
        self.last_xml_loss = 0.0

    def extra_repr(self) -> str:
        return f"lam={self.lam}, ridge={self.ridge}"

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor,
              indices_tuple: Optional[tuple] = None) -> torch.Tensor:
        if indices_tuple is None and self.miner is not None:
            indices_tuple = self.miner(embeddings, labels)
        return self.loss(embeddings, labels, indices_tuple)

    def xml_loss(self, embeddings: torch.Tensor, labels: torch.Tensor,
                 histograms: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``L_xml`` for embeddings [B, d], labels [B], histograms [B, m]; None when it does not apply."""
        if histograms is None:
            return None
        if histograms.dim() != 2 or histograms.shape[0] != embeddings.shape[0]:
            raise ValueError(f"histograms must be [B, m] with B = {embeddings.shape[0]}, "
                             f"got {tuple(histograms.shape)}")
        in_a, in_b = class_halves(labels)
        if int(in_a.sum()) < 2 or int(in_b.sum()) < 2:  # also covers a batch with fewer than 2 classes
            return None
        h_a, z_a, y_a = histograms[in_a], embeddings[in_a], labels[in_a]  # [a, m], [a, d], [a]
        h_b, z_b, y_b = histograms[in_b], embeddings[in_b], labels[in_b]
        z_hat_b = ridge_fit_predict(h_a, z_a, h_b, self.ridge)  # [b, d]: B expressed with A's prototypes
        z_hat_a = ridge_fit_predict(h_b, z_b, h_a, self.ridge)  # [a, d]
        return self._loss(z_hat_b, y_b) + self._loss(z_hat_a, y_a)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, histograms: Optional[torch.Tensor] = None,
                indices_tuple: Optional[tuple] = None) -> torch.Tensor:
        base = self._loss(embeddings, labels, indices_tuple)
        self.last_base_loss = float(base.detach())
        self.last_xml_loss = 0.0
        if self.lam == 0:
            return base
        reg = self.xml_loss(embeddings, labels, histograms)
        if reg is None:
            return base
        self.last_xml_loss = float(reg.detach())
        return base + self.lam * reg


__all__ = ["CrossBatchMetricLoss", "class_halves"]
