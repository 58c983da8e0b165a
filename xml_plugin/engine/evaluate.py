"""Retrieval metrics (Precision@1, R-Precision, MAP@R) with PML's AccuracyCalculator and faiss."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.detach().float().cpu()


def retrieval_metrics(query, query_labels, reference=None, reference_labels=None,
                      normalize: bool = True) -> Dict[str, float]:
    """P@1, R-Precision and MAP@R of ``query`` against ``reference`` (k = the largest class size).

    ``reference=None`` compares the query set with itself, each query excluded from its own neighbours.
    Embeddings are L2-normalised first (``normalize``); the search is exact (faiss flat index).
    """
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    q = _as_tensor(query)
    ql = _as_tensor(query_labels).long()
    if normalize:
        q = torch.nn.functional.normalize(q, dim=1)
    if q.shape[0] != ql.shape[0]:
        raise ValueError(f"{q.shape[0]} query embeddings but {ql.shape[0]} labels")
    calc = AccuracyCalculator(include=METRICS, k="max_bin_count", device=torch.device("cpu"))
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
    return {k: float(out[k]) for k in METRICS}


def split_metrics(embeddings: torch.Tensor, labels: torch.Tensor, is_query: Optional[np.ndarray] = None,
                  is_gallery: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Metrics on a test set: query vs gallery when the data set has them (In-Shop), else the set against itself."""
    if is_query is not None and is_gallery is not None:
        qm, gm = torch.as_tensor(is_query, dtype=torch.bool), torch.as_tensor(is_gallery, dtype=torch.bool)
        return retrieval_metrics(embeddings[qm], labels[qm], embeddings[gm], labels[gm])
    return retrieval_metrics(embeddings, labels)
