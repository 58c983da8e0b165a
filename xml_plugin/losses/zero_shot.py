"""GSP's zero-shot regulariser (ZSR) as a loss wrapper (docs/methods.md, GSP: zero-shot regulariser).

``L = (1 - weight) * L_dml + weight * L_zsr``. Learnable class embeddings ``Psi`` [C, D]; the batch is split by
class into two class-disjoint halves A and B; a ridge fit from A's attributes (the pooling's ``histogram``) to
``Psi[y_A]`` predicts B's class embeddings, which are scored against every class (``scale * Yhat_B Psi^T``)
with softmax cross-entropy; the same with A and B swapped, and the two averaged. The defaults are the authors'
code's (docs/gsp.md, "Zero-shot loss"): ``Psi`` He-normal, alternate classes of the batch as the halves, and
``(1 - weight) L + weight log C`` while there are no attributes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..registry import register
from .cross_batch import class_halves
from .ridge import ridge_fit_predict

CLASS_EMBEDDING_INITS = ("he_normal", "unit")
SPLITS = ("alternate", "sorted")
NO_HISTOGRAMS = ("uniform", "base")
# the std of a standard normal truncated to [-2, 2]: Keras' truncated He-normal divides by it so that the
# truncated samples have the std sqrt(2 / fan_in)
_TRUNCATED_STD = 0.87962566103423978


def he_normal_(weight: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """In place, Keras' ``he_normal`` for a [fan_in, fan_out] matrix (the GSP authors' ``Psi`` [C, D]: fan_in = C):
    a normal truncated at two of its stds, scaled so that the samples' std is ``sqrt(2 / fan_in)``."""
    if weight.dim() != 2:
        raise ValueError(f"he_normal_ expects a 2-D tensor [fan_in, fan_out], got shape {tuple(weight.shape)}")
    std = math.sqrt(2.0 / weight.shape[0]) / _TRUNCATED_STD
    with torch.no_grad():
        sample = torch.empty_like(weight)
        nn.init.trunc_normal_(sample, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=generator)
        weight.copy_(sample * std)
    return weight


def alternate_class_halves(labels: torch.Tensor):
    """The authors' split: the batch's classes in the order they first appear, alternately to A and B -> two
    class-disjoint boolean masks [B]. With a class-grouped batch of randomly ordered classes (PML's
    MPerClassSampler) these are random class-disjoint halves; one class: B is empty."""
    uniq, inverse = torch.unique(labels, return_inverse=True)  # sorted classes, [B] -> index into them
    positions = torch.arange(labels.shape[0], device=labels.device)
    first = torch.full((len(uniq),), labels.shape[0], dtype=torch.long, device=labels.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")  # [c] first position of each class
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(len(uniq), device=labels.device)  # order of appearance
    in_a = rank[inverse] % 2 == 0
    return in_a, ~in_a


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@register("loss_wrapper", name="zsr")
class ZeroShotLoss(nn.Module):
    """Base DML loss plus ZSR: ``(1 - weight) * L(Z, y) + weight * L_zsr`` (docs/methods.md, GSP).

    ``L_zsr = (CE(scale * Yhat_B Psi^T, y_B) + CE(scale * Yhat_A Psi^T, y_A)) / 2`` with
    ``Yhat_B = ridge_fit_predict(a_A, Psi[y_A], a_B, ridge)`` (the routine XML's wrapper shares). ``Psi``
    (``class_embeddings``) is learned with the model, initialised ``"he_normal"`` (std ``sqrt(2 / C)``, the authors')
    or ``"unit"`` (random unit rows). ``split``: ``"alternate"`` classes of the batch (the authors') or ``"sorted"``
    (the lower half of the batch's sorted labels in A). When ``L_zsr`` does not apply (``histograms`` None, e.g. GSP
    before its prototypes exist, or fewer than 2 classes): ``no_histograms="uniform"`` gives
    ``(1 - weight) L + weight log C``, the value of ``L_zsr`` for zero attributes (the authors'), ``"base"`` the
    DML loss alone. ``last_base_loss`` and ``last_zsr_loss`` hold the last call's parts, for logging.
    """

    needs_histograms = True

    def __init__(self, loss: nn.Module, num_classes: int, histogram_size: int, class_embedding_size: int = 128,
                 weight: float = 0.1, ridge: float = 0.05, scale: float = 9.5, miner: Optional[nn.Module] = None,
                 class_embedding_init: str = "he_normal", split: str = "alternate", no_histograms: str = "uniform"):
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
        for name, value, allowed in (("class_embedding_init", class_embedding_init, CLASS_EMBEDDING_INITS),
                                     ("split", split, SPLITS), ("no_histograms", no_histograms, NO_HISTOGRAMS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.loss = loss
        self.miner = miner
        self.class_embedding_init, self.split, self.no_histograms = class_embedding_init, split, no_histograms
        self.weight = float(weight)
        self.ridge = float(ridge)
        self.scale = float(scale)
        if class_embedding_init == "he_normal":
            psi = he_normal_(torch.empty(num_classes, class_embedding_size))  # Psi [C, D]
        else:
            psi = torch.randn(num_classes, class_embedding_size)
            psi = psi / psi.norm(dim=1, keepdim=True)
        self.class_embeddings = nn.Parameter(psi)
        self.last_base_loss = 0.0
        self.last_zsr_loss = 0.0

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, histogram_size={self.histogram_size}, "
                f"class_embedding_size={self.class_embeddings.shape[1]}, weight={self.weight}, "
                f"ridge={self.ridge}, scale={self.scale}, class_embedding_init={self.class_embedding_init!r}, "
                f"split={self.split!r}, no_histograms={self.no_histograms!r}")

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
        in_a, in_b = alternate_class_halves(labels) if self.split == "alternate" else class_halves(labels)
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
        if self.weight == 0:
            return base
        zsr = self.zsr_loss(labels, histograms)
        if zsr is None:
            if self.no_histograms == "base":
                return base
            zsr = math.log(self.num_classes)  # L_zsr of zero attributes: uniform logits over the C classes
        self.last_zsr_loss = float(zsr.detach()) if torch.is_tensor(zsr) else zsr
        return (1 - self.weight) * base + self.weight * zsr


__all__ = ["ZeroShotLoss", "he_normal_", "alternate_class_halves"]
