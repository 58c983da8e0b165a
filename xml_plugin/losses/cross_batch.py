"""XML's cross-batch loss wrapper (docs/methods.md, XML: "cross-batch loss").

``L = L(Z, y) + lam * L_xml`` with ``L_xml = L(Zhat_B, y_B) + L(Zhat_A, y_A)``: the batch is split by class
into two class-disjoint halves A and B; prototypes fitted to one half reconstruct the other half's embeddings
from its histograms, and the base loss is applied to these reconstructions. The fit (``cross_fit``) is either a
fresh closed-form ridge regression from the half's histograms to its embeddings (``ridge``) or one step of the
pooling's prototype recursion, with its forgetting factor, from its state before the batch (``recursive``).
Drop-in like PML's ``CrossBatchMemory``: any PML loss, optional miner.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..models.xml_pooling import RecursionState, rls_update
from ..registry import register
from .ridge import ridge_fit_predict

CROSS_FITS = ("ridge", "recursive")


def class_halves(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split a batch by class: boolean masks (A, B) over [B] samples.

    The batch's sorted unique labels: the first ``floor(C/2)`` go to A, the rest (``ceil(C/2)``) to B.
    """
    classes = torch.unique(labels, sorted=True)
    in_a = torch.isin(labels, classes[: len(classes) // 2])
    return in_a, ~in_a


def recursive_fit_predict(state: RecursionState, h_fit: torch.Tensor, z_fit: torch.Tensor,
                          h_pred: torch.Tensor) -> torch.Tensor:
    """``H_pred W`` with ``W`` one step of the prototype recursion (:func:`rls_update`) from ``(P_{t-1}, Q_{t-1})``
    with the half ``(H_fit, Z_fit)``: ``W = (alpha P + H^T H + eps I)^-1 (alpha Q + H^T Z)``.

    ``h_fit`` [a, m], ``z_fit`` [a, d], ``h_pred`` [b, m] -> [b, d]; differentiable in ``z_fit`` and the histograms
    (the state is a constant). With an empty state (``P = Q = 0``) it is the primal ridge fit of
    :func:`~xml_plugin.losses.ridge.ridge_fit_predict`.
    """
    _, _, w = rls_update(state.p, state.q, h_fit, z_fit, state.forgetting, state.ridge)  # [m, d]
    return (h_pred.to(w.dtype) @ w).to(z_fit.dtype)


class CrossReconstruction(NamedTuple):
    """Each half expressed with the prototypes fitted to the other: ``z_hat_b = H_B W_A`` [b, d], ``z_hat_a`` [a, d]."""
    in_a: torch.Tensor  # [B] bool
    in_b: torch.Tensor  # [B] bool
    z_hat_a: torch.Tensor
    z_hat_b: torch.Tensor


class LossTerms(NamedTuple):
    """The two terms of the total ``base + lam * cross``: ``base = L(Z, y)``, ``cross = L_xml`` (None if it does not
    apply)."""
    base: torch.Tensor
    cross: Optional[torch.Tensor]


@register("loss_wrapper", name="xml")
class CrossBatchMetricLoss(nn.Module):
    """Base loss plus XML's cross-batch regulariser: ``L(Z, y) + lam * (L(Zhat_B, y_B) + L(Zhat_A, y_A))``.

    ``Zhat_B = H_B W_A``. ``cross_fit``: ``ridge`` (default): ``W_A`` the ridge fit (``ridge``) of ``Z_A`` on ``H_A``
    (shared routine :func:`~xml_plugin.losses.ridge.ridge_fit_predict`); ``recursive``: ``W_A`` one step of the
    pooling's recursion from its state before the batch with ``(H_A, Z_A)`` (:func:`recursive_fit_predict`; the
    state comes from ``recursion_state=`` or from the pooling given to :meth:`bind_pooling`).
    Gradients flow through ``Z`` (and ``H`` if it has any); ``Z_B`` reaches ``L_xml`` only through ``W_B`` (the fit
    that reconstructs A), never as the target of ``Zhat_B``.
    The regulariser is skipped (base loss only) when ``lam == 0``, ``histograms`` is None, the batch has fewer
    than 2 classes, or a half has fewer than 2 samples. With a ``miner``, the base batch (unless an
    ``indices_tuple`` is given) and each reconstruction are mined separately.
    ``last_base_loss`` and ``last_xml_loss`` hold the last call's components as floats, for logging.
    """

    needs_histograms = True

    def __init__(self, loss: nn.Module, lam: float = 1.0, ridge: float = 1e-3, miner: Optional[nn.Module] = None,
                 cross_fit: str = "ridge"):
        super().__init__()
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0, got {ridge!r}")
        if cross_fit not in CROSS_FITS:
            raise ValueError(f"cross_fit must be one of {CROSS_FITS}, got {cross_fit!r}")
        self.loss = loss
        self.miner = miner
        self.lam = float(lam)
        self.ridge = float(ridge)
        self.cross_fit = cross_fit
        self._pooling = ()  # (pooling,) once bound; a tuple, so that the pooling is not registered as a submodule
        self.last_base_loss = 0.0
        self.last_xml_loss = 0.0

    def extra_repr(self) -> str:
        return f"lam={self.lam}, ridge={self.ridge}, cross_fit={self.cross_fit!r}"

    def bind_pooling(self, pooling: nn.Module) -> None:
        """Read ``cross_fit: recursive``'s state from ``pooling.recursion_state`` (set by every training forward of
        :class:`~xml_plugin.models.xml_pooling.PrototypePooling`). Harmless with ``cross_fit: ridge``."""
        if self.cross_fit == "recursive" and not hasattr(pooling, "recursion_state"):
            raise ValueError(f"cross_fit='recursive' needs a pooling with a prototype recursion (pooling 'xml'); "
                             f"{type(pooling).__name__} has none: use cross_fit 'ridge'")
        self._pooling = (pooling,)

    def _recursion_state(self, given: Optional[RecursionState]) -> RecursionState:
        state = given if given is not None else (self._pooling[0].recursion_state if self._pooling else None)
        if state is None:
            raise RuntimeError("cross_fit='recursive' needs the pooling's recursion state: call bind_pooling(pooling) "
                               "once, or pass recursion_state=pooling.recursion_state, after a training forward")
        return state

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor,
              indices_tuple: Optional[tuple] = None) -> torch.Tensor:
        if indices_tuple is None and self.miner is not None:
            indices_tuple = self.miner(embeddings, labels)
        return self.loss(embeddings, labels, indices_tuple)

    def reconstructions(self, embeddings: torch.Tensor, labels: torch.Tensor, histograms: Optional[torch.Tensor],
                        recursion_state: Optional[RecursionState] = None) -> Optional[CrossReconstruction]:
        """Each half reconstructed by the fit (``cross_fit``) to the other, for embeddings [B, d], labels [B],
        histograms [B, m]; None when the regulariser does not apply (no histogram, a half with < 2 samples)."""
        if histograms is None:
            return None
        if histograms.dim() != 2 or histograms.shape[0] != embeddings.shape[0]:
            raise ValueError(f"histograms must be [B, m] with B = {embeddings.shape[0]}, "
                             f"got {tuple(histograms.shape)}")
        in_a, in_b = class_halves(labels)
        if int(in_a.sum()) < 2 or int(in_b.sum()) < 2:  # also covers a batch with fewer than 2 classes
            return None
        h_a, z_a = histograms[in_a], embeddings[in_a]  # [a, m], [a, d]
        h_b, z_b = histograms[in_b], embeddings[in_b]
        if self.cross_fit == "recursive":
            state = self._recursion_state(recursion_state)
            z_hat_b = recursive_fit_predict(state, h_a, z_a, h_b)  # [b, d]: B expressed with A's prototypes
            z_hat_a = recursive_fit_predict(state, h_b, z_b, h_a)  # [a, d]
        else:
            z_hat_b = ridge_fit_predict(h_a, z_a, h_b, self.ridge)
            z_hat_a = ridge_fit_predict(h_b, z_b, h_a, self.ridge)
        return CrossReconstruction(in_a, in_b, z_hat_a, z_hat_b)

    def xml_loss(self, embeddings: torch.Tensor, labels: torch.Tensor, histograms: Optional[torch.Tensor],
                 recursion_state: Optional[RecursionState] = None) -> Optional[torch.Tensor]:
        """``L_xml`` for embeddings [B, d], labels [B], histograms [B, m]; None when it does not apply."""
        rec = self.reconstructions(embeddings, labels, histograms, recursion_state)
        if rec is None:
            return None
        return self._loss(rec.z_hat_b, labels[rec.in_b]) + self._loss(rec.z_hat_a, labels[rec.in_a])

    def terms(self, embeddings: torch.Tensor, labels: torch.Tensor, histograms: Optional[torch.Tensor] = None,
              indices_tuple: Optional[tuple] = None, recursion_state: Optional[RecursionState] = None) -> LossTerms:
        """Both terms of the total, as tensors in the graph (for ``torch.autograd.grad`` of each); ``L_xml`` is
        computed whatever ``lam`` (also 0)."""
        base = self._loss(embeddings, labels, indices_tuple)
        return LossTerms(base, self.xml_loss(embeddings, labels, histograms, recursion_state))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, histograms: Optional[torch.Tensor] = None,
                indices_tuple: Optional[tuple] = None, recursion_state: Optional[RecursionState] = None) -> torch.Tensor:
        if self.lam == 0:
            base, reg = self._loss(embeddings, labels, indices_tuple), None
        else:
            base, reg = self.terms(embeddings, labels, histograms, indices_tuple, recursion_state)
        self.last_base_loss = float(base.detach())
        self.last_xml_loss = 0.0 if reg is None else float(reg.detach())
        return base if reg is None else base + self.lam * reg


__all__ = ["CROSS_FITS", "CrossBatchMetricLoss", "CrossReconstruction", "LossTerms", "class_halves",
           "recursive_fit_predict"]
