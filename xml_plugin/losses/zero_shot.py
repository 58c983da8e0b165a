"""GSP's zero-shot regulariser (ZSR) as a loss wrapper (docs/methods.md, GSP: zero-shot regulariser).

``L = (1 - weight) * L_dml + weight * L_zsr``. Learnable class embeddings ``Psi`` [C, D]; the batch is split by
class into two class-disjoint halves A and B; a ridge fit from A's attributes (the pooling's ``histogram``) to
``Psi[y_A]`` predicts B's class embeddings, which are scored against every class (``scale * Yhat_B Psi^T``)
with softmax cross-entropy; the same with A and B swapped, and the two averaged.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..registry import register
from .cross_batch import class_halves
from .ridge import ridge_fit_predict


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@register("loss_wrapper", name="zsr")
class ZeroShotLoss(nn.Module):
    """Base DML loss plus ZSR: ``(1 - weight) * L(Z, y) + weight * L_zsr`` (docs/methods.md, GSP).

    ``L_zsr = (CE(scale * Yhat_B Psi^T, y_B) + CE(scale * Yhat_A Psi^T, y_A)) / 2`` with
    ``Yhat_B = ridge_fit_predict(a_A, Psi[y_A], a_B, ridge)`` (the routine XML's wrapper shares). ``Psi``
    (``class_embeddings``, rows initialised on the unit sphere) is learned with the model. When ``histograms``
    is None (e.g. GSP before its prototype init) or the batch has fewer than 2 classes, the DML loss alone
    is returned (unweighted). ``last_base_loss`` and ``last_zsr_loss`` hold the last call's parts, for logging.
    """

    needs_histograms = True

    def __init__(self, loss: nn.Module, num_classes: int, histogram_size: int, class_embedding_size: int = 128,
                 weight: float = 0.1, ridge: float = 0.05, scale: float = 9.5, miner: Optional[nn.Module] = None):
        super().__init__()
        self.num_classes = _positive_int("num_classes", num_classes)
        self.histogram_size = _positive_int("histogram_size", histogram_size)
        class_embedding_size = _positive_int("class_embedding_size", class_embedding_size)
        if not (isinstance(weight, (int, float)) and 0 <= weight <= 1):
            raise ValueError(f"weight must be in [0, 1], got {weight!r}")
        if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge > 0):
            raise ValueError(f"ridge must be a finite number > 0, got {ridge!r}")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.loss = loss
        self.miner = miner
        self.weight = float(weight)
        self.ridge = float(ridge)
        self.scale = float(scale)
        psi = torch.randn(num_classes, class_embedding_size)
        self.class_embeddings = nn.Parameter(psi / psi.norm(dim=1, keepdim=True))  # Psi [C, D]
        self.last_base_loss = 0.0
        self.last_zsr_loss = 0.0

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, histogram_size={self.histogram_size}, "
                f"class_embedding_size={self.class_embeddings.shape[1]}, weight={self.weight}, "
                f"ridge={self.ridge}, scale={self.scale}")

    def _predict_and_score(self, a_fit: torch.Tensor, y_fit: torch.Tensor, a_pred: torch.Tensor,
                           y_pred: torch.Tensor) -> torch.Tensor:
        psi = self.class_embeddings
        y_hat = ridge_fit_predict(a_fit, psi[y_fit], a_pred, self.ridge)  # [b, D]
        logits = self.scale * y_hat @ psi.T  # [b, C]
        return nn.functional.cross_entropy(logits, y_pred)

    def zsr_loss(self, labels: torch.Tensor, histograms: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``L_zsr`` for labels [B] and attributes [B, m]; None when it does not apply."""
        if histograms is None:
            return None
        if histograms.dim() != 2 or histograms.shape != (labels.shape[0], self.histogram_size):
            raise ValueError(f"histograms must be [B, {self.histogram_size}] with B = {labels.shape[0]}, "
                             f"got {tuple(histograms.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must be in 0..{self.num_classes - 1} (num_classes={self.num_classes}), "
                             f"got range {int(labels.min())}..{int(labels.max())}")
        in_a, in_b = class_halves(labels)
        if not bool(in_a.any()) or not bool(in_b.any()):  # fewer than 2 classes
            return None
        a_a, y_a, a_b, y_b = histograms[in_a], labels[in_a], histograms[in_b], labels[in_b]
        return 0.5 * (self._predict_and_score(a_a, y_a, a_b, y_b) + self._predict_and_score(a_b, y_b, a_a, y_a))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, histograms: Optional[torch.Tensor] = None,
                indices_tuple: Optional[tuple] = None) -> torch.Tensor:
        if indices_tuple is None and self.miner is not None:
            indices_tuple = self.miner(embeddings, labels)
        base = self.loss(embeddings, labels, indices_tuple)
        self.last_base_loss = float(base.detach())
        self.last_zsr_loss = 0.0
        zsr = self.zsr_loss(labels, histograms) if self.weight > 0 else None
        if zsr is None:
            return base
        self.last_zsr_loss = float(zsr.detach())
        return (1 - self.weight) * base + self.weight * zsr


__all__ = ["ZeroShotLoss"]
