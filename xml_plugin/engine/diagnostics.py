"""Health diagnostics of XML's prototype pooling and cross-batch loss, and the embedding-space measures of Roth et al.
(ICML 2020), as pure functions returning plain floats (docs/xml.md, "Diagnostics").

Two entry points, each a flat ``{name: float}`` dict (NaN where a measure does not apply):

- :func:`xml_health` ``(pooling, embeddings, histograms, labels, loss)``: GAP reconstruction error, prototype usage,
  cross-batch reconstruction error, and the base and cross-batch loss terms with their gradient norms at the
  embeddings; for a training batch (the pooling's outputs) or a whole evaluation set.
- :func:`embedding_space_metrics` ``(embeddings, labels)``: spectral decay ``rho``, mean intra- and inter-class
  distances and their ratio, NMI; for any embeddings (a method's test embeddings).

Nothing here changes a module's state: no recursion step, no optimizer, gradients by ``torch.autograd.grad`` only.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from ..models.xml_pooling import PrototypePooling, RecursionState

NAN = float("nan")
HEALTH_KEYS = ("gap_error", "unused_prototypes", "effective_prototypes", "cross_error", "base_loss", "cross_loss",
               "cross_term", "base_grad_norm", "cross_grad_norm")
EMBEDDING_KEYS = ("spectral_decay", "intra_class_distance", "inter_class_distance", "intra_inter_ratio", "nmi")


def _rows(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.detach().double().cpu()


def _labels(y) -> torch.Tensor:
    return (y.detach().cpu() if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))).flatten()


# ---------------------------------------------------------------------------------------------
# XML health

def gap_reconstruction_error(embeddings, histograms, prototypes) -> float:
    """Mean relative error of GAP as a convex combination of prototypes: ``mean_i ||z_i - W^T h_i|| / ||z_i||``.

    ``embeddings`` [N, d] (GAP, not normalised), ``histograms`` [N, m], ``prototypes`` W [m, d].
    0: every GAP is exactly its histogram's mix of prototypes; 1: ``W^T h`` is as far from ``z`` as 0 is.
    """
    z, h, w = _rows(embeddings), _rows(histograms), _rows(prototypes)
    err = (z - h @ w).norm(dim=1) / z.norm(dim=1).clamp_min(1e-12)  # [N]
    return float(err.mean())


def prototype_usage(histograms) -> Dict[str, float]:
    """Over a set of histograms [N, m]: ``unused_prototypes``, the number of prototypes with no mass in any row, and
    ``effective_prototypes = exp(-sum_k p_k log p_k)`` with ``p`` the mean histogram (``m`` when all are used
    equally, 1 when one prototype takes all the mass)."""
    h = _rows(histograms)
    p = h.mean(dim=0)  # [m]
    p = p / p.sum().clamp_min(1e-300)
    nz = p[p > 0]
    return {"unused_prototypes": float((h.sum(dim=0) == 0).sum()),
            "effective_prototypes": float(torch.exp(-(nz * nz.log()).sum()))}


def cross_batch_error(loss: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor, histograms: torch.Tensor,
                      recursion_state: Optional[RecursionState] = None) -> float:
    """Mean relative error of the cross-batch reconstructions, over the rows of both halves:
    ``mean_i ||zhat_i - z_i|| / ||z_i||`` with ``zhat`` of half A from the fit to half B and vice versa
    (the wrapper's own ``cross_fit``, :meth:`CrossBatchMetricLoss.reconstructions`); NaN when it does not apply."""
    with torch.no_grad():
        rec = loss.reconstructions(embeddings.detach(), labels, histograms.detach(), recursion_state)
    if rec is None:
        return NAN
    z = embeddings.detach()
    err_a = (rec.z_hat_a - z[rec.in_a]).norm(dim=1) / z[rec.in_a].norm(dim=1).clamp_min(1e-12)
    err_b = (rec.z_hat_b - z[rec.in_b]).norm(dim=1) / z[rec.in_b].norm(dim=1).clamp_min(1e-12)
    return float(torch.cat([err_a, err_b]).double().mean())


def loss_terms(loss: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor, histograms: torch.Tensor,
               recursion_state: Optional[RecursionState] = None) -> Dict[str, float]:
    """The two terms of XML's total at a batch and the Frobenius norm of each one's gradient at the embeddings:
    ``base_loss = L(Z, y)``, ``cross_loss = L_xml``, ``cross_term = lam * L_xml``, ``base_grad_norm = ||dL/dZ||``,
    ``cross_grad_norm = ||d(lam L_xml)/dZ||`` (the histograms held fixed). ``L_xml`` is computed also at ``lam = 0``;
    the cross entries are NaN when it does not apply."""
    z = embeddings.detach().clone().requires_grad_(True)  # [B, d]
    with torch.enable_grad():
        base, cross = loss.terms(z, labels, None if histograms is None else histograms.detach(),
                                 recursion_state=recursion_state)
        (g_base,) = torch.autograd.grad(base, z, retain_graph=cross is not None, allow_unused=True)
        out = {"base_loss": float(base.detach()), "base_grad_norm": _norm(g_base)}
        if cross is None:
            return {**out, "cross_loss": NAN, "cross_term": NAN, "cross_grad_norm": NAN}
        (g_cross,) = torch.autograd.grad(cross, z, allow_unused=True)
    lam = float(loss.lam)
    return {**out, "cross_loss": float(cross.detach()), "cross_term": lam * float(cross.detach()),
            "cross_grad_norm": lam * _norm(g_cross)}


def _norm(grad: Optional[torch.Tensor]) -> float:
    return 0.0 if grad is None else float(grad.double().norm())


def xml_health(pooling: nn.Module, embeddings: torch.Tensor, histograms: Optional[torch.Tensor],
               labels: Optional[torch.Tensor] = None, loss: Optional[nn.Module] = None,
               recursion_state: Optional[RecursionState] = None) -> Dict[str, float]:
    """All XML health measures at one set of pooling outputs, as a flat dict with the keys of ``HEALTH_KEYS``.

    ``embeddings`` [N, d] and ``histograms`` [N, m] are the pooling's outputs (a training batch, or an evaluation
    set embedded in eval mode); ``gap_error`` needs a :class:`PrototypePooling` (its ``prototypes``), the loss entries
    need ``labels`` [N] and the cross-batch wrapper ``loss`` (:func:`cross_batch_error`, :func:`loss_terms`).
    ``recursion_state`` (for ``cross_fit: recursive``): default the pooling's, i.e. the state before its latest
    training update. Measures that do not apply are NaN.
    """
    out = dict.fromkeys(HEALTH_KEYS, NAN)
    if histograms is None:
        return out
    if isinstance(pooling, PrototypePooling):
        out["gap_error"] = gap_reconstruction_error(embeddings, histograms, pooling.prototypes)
    out.update(prototype_usage(histograms))
    if loss is not None and labels is not None and hasattr(loss, "terms"):
        if recursion_state is None:
            recursion_state = getattr(pooling, "recursion_state", None)
        if getattr(loss, "cross_fit", "ridge") == "recursive" and recursion_state is None:
            return out  # a pooling never trained: no recursion to step
        out["cross_error"] = cross_batch_error(loss, embeddings, labels, histograms, recursion_state)
        out.update(loss_terms(loss, embeddings, labels, histograms, recursion_state))
    return out


# ---------------------------------------------------------------------------------------------
# embedding space (Roth et al., ICML 2020)

def spectral_decay(embeddings, skip_largest: int = 0) -> float:
    """Roth et al.'s ``rho``: ``KL(U || S) = sum_k (1/K) log((1/K) / S_k)`` with ``S`` the singular values of the
    embedding matrix [N, D] (as given: rows not centred), sorted in decreasing order, the ``skip_largest`` largest
    dropped, normalised to sum to 1, and ``U`` uniform over the ``K = min(N, D) - skip_largest`` values left.
    0 for a flat spectrum (every direction used alike), larger as the variance concentrates in fewer directions;
    ``inf`` if a singular value is 0 (a rank-deficient embedding)."""
    s = torch.linalg.svdvals(_rows(embeddings))[int(skip_largest):]  # [K], decreasing
    if len(s) == 0:
        raise ValueError(f"skip_largest={skip_largest} leaves no singular value")
    p = s / s.sum()
    if bool((p <= 0).any()):
        return math.inf
    k = len(p)
    return float(-math.log(k) - p.log().mean())


def class_distances(embeddings, labels) -> Dict[str, float]:
    """``intra_class_distance``: the mean over classes (with 2+ samples) of the mean Euclidean distance over the
    class's distinct pairs; ``inter_class_distance``: the mean Euclidean distance over distinct pairs of class means;
    ``intra_inter_ratio``: their ratio. On the embeddings as given (NaN where a measure has no pair)."""
    z = _rows(embeddings)
    y = _labels(labels)
    classes = torch.unique(y)
    intra, means = [], []
    for c in classes:
        zc = z[y == c]  # [n_c, D]
        means.append(zc.mean(dim=0))
        if len(zc) >= 2:
            n = len(zc)
            intra.append(float(torch.cdist(zc, zc).sum()) / (n * (n - 1)))  # the diagonal is 0
    intra_mean = float(np.mean(intra)) if intra else NAN
    inter_mean = _mean_pairwise_distance(torch.stack(means)) if len(classes) >= 2 else NAN
    return {"intra_class_distance": intra_mean, "inter_class_distance": inter_mean,
            "intra_inter_ratio": intra_mean / inter_mean if inter_mean > 0 else NAN}


def _mean_pairwise_distance(points: torch.Tensor, chunk: int = 1024) -> float:
    """Mean Euclidean distance over the distinct pairs of ``points`` [C, D], in row chunks ([chunk, C] at a time)."""
    c = len(points)
    total = sum(float(torch.cdist(points[i:i + chunk], points).sum()) for i in range(0, c, chunk))
    return total / (c * (c - 1))


def nmi(embeddings, labels) -> float:
    """NMI between the labels and a k-means clustering into as many clusters as classes (PML's AccuracyCalculator,
    ``include=("NMI",)``: its faiss k-means, 20 iterations, faiss's fixed seed; sklearn's NMI); NaN with fewer than 2 classes."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKMeans

    z = _rows(embeddings).float()
    y = _labels(labels)
    if len(torch.unique(y)) < 2 or len(z) <= len(torch.unique(y)):
        return NAN
    # PML's default k-means, without faiss's warning about fewer than 39 points per cluster (a test set's usual size)
    kmeans = FaissKMeans(niter=20, gpu=False, min_points_per_centroid=1)
    calc = AccuracyCalculator(include=("NMI",), device=torch.device("cpu"), kmeans_func=kmeans)
    return float(calc.get_accuracy(z, y)["NMI"])


def embedding_space_metrics(embeddings, labels, normalize: bool = True) -> Dict[str, float]:
    """Roth et al.'s measures of an embedding [N, D] with labels [N], as a flat dict with the keys of
    ``EMBEDDING_KEYS``: :func:`spectral_decay` (``rho``, whole spectrum), :func:`class_distances`, :func:`nmi`;
    on L2-normalised rows (``normalize``, as retrieval uses them)."""
    z = _rows(embeddings)
    if normalize:
        z = torch.nn.functional.normalize(z, dim=1)
    return {"spectral_decay": spectral_decay(z), **class_distances(z, labels), "nmi": nmi(z, labels)}


__all__ = ["HEALTH_KEYS", "EMBEDDING_KEYS", "xml_health", "embedding_space_metrics", "gap_reconstruction_error",
           "prototype_usage", "cross_batch_error", "loss_terms", "spectral_decay", "class_distances", "nmi"]
