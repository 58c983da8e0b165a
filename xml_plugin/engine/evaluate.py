"""Retrieval metrics (Precision@1, R-Precision, MAP@R, Recall@K) with PML's AccuracyCalculator and faiss."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch

METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.detach().float().cpu()


def _calculator(recall_ks: Sequence[int]):
    """PML's AccuracyCalculator (faiss k-NN, k = the largest class size) that also counts Recall@K from the same
    neighbour lists, searching max(K) neighbours when that is more."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    class _WithRecall(AccuracyCalculator):
        def determine_k(self, bin_counts, num_reference_embeddings, ref_includes_query):
            k = super().determine_k(bin_counts, num_reference_embeddings, ref_includes_query)
            self.available = num_reference_embeddings - int(ref_includes_query)
            return min(max([k, *recall_ks]), self.available)

        def _get_accuracy(self, function_dict, **kwargs):
            out = super()._get_accuracy(function_dict, **kwargs)
            knn_labels, labels = kwargs["knn_labels"], kwargs["query_labels"]
            keep = torch.as_tensor(kwargs["not_lone_query_mask"], dtype=torch.bool)  # queries with a positive
            hits = (knn_labels == labels[:, None])[keep]  # [Q', k]
            for k in recall_ks:
                if k <= self.available:  # a K larger than the gallery is dropped
                    out[f"recall_at_{k}"] = float(hits[:, :k].any(dim=1).float().mean()) if len(hits) else math.nan
            return out

    return _WithRecall(include=METRICS, k="max_bin_count", device=torch.device("cpu"))


def retrieval_metrics(query, query_labels, reference=None, reference_labels=None,
                      normalize: bool = True, recall_ks: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """P@1, R-Precision and MAP@R of ``query`` against ``reference`` (k = the largest class size), and Recall@K for
    each K of ``recall_ks`` (``recall_at_K``: the share of queries with a same-label item among their K nearest; K
    larger than the reference set are left out).

    ``reference=None`` compares the query set with itself, each query excluded from its own neighbours.
    Embeddings are L2-normalised first (``normalize``); the search is exact (faiss flat index).
    """
    q = _as_tensor(query)
    ql = _as_tensor(query_labels).long()
    if normalize:
        q = torch.nn.functional.normalize(q, dim=1)
    if q.shape[0] != ql.shape[0]:
        raise ValueError(f"{q.shape[0]} query embeddings but {ql.shape[0]} labels")
    ks = tuple(sorted({int(k) for k in (recall_ks or ())}))
    if any(k < 1 for k in ks):
        raise ValueError(f"Recall@K needs K >= 1, got {list(ks)}")
    calc = _calculator(ks)
    if reference is None:
        if q.shape[0] < 2:
            raise ValueError("need at least 2 query embeddings to compare a set with itself")
        out = calc.get_accuracy(q, ql)
    else:
        r = _as_tensor(reference)
        rl = _as_tensor(reference_labels).long()
        if normalize:
            r = torch.nn.functional.normalize(r, dim=1)
        if not np.isin(ql.numpy(), rl.numpy()).any():
            raise ValueError("no query label occurs among the reference labels: nothing can be retrieved")
        out = calc.get_accuracy(q, ql, r, rl, ref_includes_query=False)
    return {k: float(v) for k, v in out.items()}


def split_metrics(embeddings: torch.Tensor, labels: torch.Tensor, is_query: Optional[np.ndarray] = None,
                  is_gallery: Optional[np.ndarray] = None, recall_ks: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """Metrics on a test set: query vs gallery when the data set has them (In-Shop), else the set against itself."""
    if is_query is not None and is_gallery is not None:
        qm, gm = torch.as_tensor(is_query, dtype=torch.bool), torch.as_tensor(is_gallery, dtype=torch.bool)
        return retrieval_metrics(embeddings[qm], labels[qm], embeddings[gm], labels[gm], recall_ks=recall_ks)
    return retrieval_metrics(embeddings, labels, recall_ks=recall_ks)


def query_gallery(dataset, idx: np.ndarray):
    """The query and gallery masks of the samples ``idx`` when the data set has them (In-Shop), else (None, None)."""
    is_q, is_g = getattr(dataset, "is_query", None), getattr(dataset, "is_gallery", None)
    if is_q is None or is_g is None:
        return None, None
    return is_q[idx], is_g[idx]


def mean_metrics(per_fold: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """The fold models' metrics averaged, metric by metric (the protocol's "separate" numbers)."""
    return {m: float(np.mean([r[m] for r in per_fold])) for m in per_fold[0]}


def fold_ensemble_metrics(embeddings: Sequence[torch.Tensor], labels: torch.Tensor, is_query: Optional[np.ndarray] = None,
                          is_gallery: Optional[np.ndarray] = None, recall_ks: Optional[Sequence[int]] = None):
    """The protocol's two test numbers of one reproduction, from the fold models' embeddings of the same test samples:
    per-fold metrics, ``separate`` (their mean) and ``concatenated`` (metrics of the L2-normalised embeddings
    concatenated, [N, folds * d]); returns ``(per_fold, separate, concatenated, concatenation)``."""
    per_fold = [split_metrics(e, labels, is_query, is_gallery, recall_ks=recall_ks) for e in embeddings]
    separate = mean_metrics(per_fold)
    cat = torch.cat([torch.nn.functional.normalize(e, dim=1) for e in embeddings], dim=1)
    return per_fold, separate, split_metrics(cat, labels, is_query, is_gallery, recall_ks=recall_ks), cat
