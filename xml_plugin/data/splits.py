"""Class-disjoint splits of the fair-comparison protocol (docs/methods.md, the protocol).

Sort the class ids; the last ``C - floor(C * (1 - test_fraction))`` of them form the test set
(with the default 0.5 and an odd C the test half gets the extra class). The folds over the first part follow a
*scheme* (``dataset.split``):

* ``default``: ``num_folds`` contiguous class groups like sklearn ``KFold`` without shuffling (the first
  ``n % num_folds`` groups get one class more); fold i validates on group i and trains on the rest;
* ``mlrc``: the Reality Check's scheme (powerful-benchmarker's ``MLRCSplitManager``): over the M sorted train/val
  classes, fold i validates on the ``floor(M / num_folds)`` classes that follow a window of ``M - floor(M /
  num_folds)`` training classes starting at position ``floor(i M / num_folds)``, wrapping around the end; when
  ``num_folds`` does not divide M some classes are never validated (Cars196: 24-class folds, two classes always train).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ..config import ConfigError

_EPS = 1e-9  # guards floor() against float error: 10 * (1 - 0.3) = 6.999...


@dataclass
class Split:
    """Index arrays into a data set: ``test`` and per fold ``(train, val)``.

    ``test_classes`` are the test set's class ids, ``fold_classes[i]`` the validation classes of
    fold i. ``query`` / ``gallery`` (subsets of ``test``) are set when the data set is evaluated
    query vs gallery (In-Shop), else None and the test set is compared with itself.
    """

    test: np.ndarray
    folds: List[Tuple[np.ndarray, np.ndarray]]
    test_classes: np.ndarray
    fold_classes: List[np.ndarray]
    query: Optional[np.ndarray] = None
    gallery: Optional[np.ndarray] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_folds(self) -> int:
        return len(self.folds)

    @property
    def trainval(self) -> np.ndarray:
        """All non-test indices (train + val of any fold), sorted."""
        return np.sort(np.concatenate(self.folds[0])) if self.folds else np.zeros(0, np.int64)

    def to_dict(self) -> Dict[str, Any]:
        def ints(a):
            return None if a is None else [int(x) for x in a]
        return {
            "test": ints(self.test),
            "folds": [{"train": ints(tr), "val": ints(va)} for tr, va in self.folds],
            "test_classes": ints(self.test_classes),
            "fold_classes": [ints(c) for c in self.fold_classes],
            "query": ints(self.query),
            "gallery": ints(self.gallery),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Split":
        def arr(a):
            return None if a is None else np.asarray(a, dtype=np.int64)
        return cls(
            test=arr(d["test"]),
            folds=[(arr(f["train"]), arr(f["val"])) for f in d["folds"]],
            test_classes=arr(d["test_classes"]),
            fold_classes=[arr(c) for c in d["fold_classes"]],
            query=arr(d.get("query")),
            gallery=arr(d.get("gallery")),
            meta=dict(d.get("meta") or {}),
        )

    def save(self, path: Union[str, Path]) -> Path:
        """Write JSON atomically (temp file in the same folder, then os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Split":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _check(test_fraction: float, num_folds: int) -> None:
    if not isinstance(num_folds, (int, np.integer)) or isinstance(num_folds, bool) or num_folds < 2:
        raise ValueError(f"num_folds must be an int >= 2, got {num_folds!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")


def fold_groups(classes: np.ndarray, num_folds: int) -> List[np.ndarray]:
    """Cut sorted ``classes`` into ``num_folds`` contiguous groups, the first ``len % num_folds`` one larger."""
    n = len(classes)
    if n < num_folds:
        raise ValueError(f"{n} train/val classes cannot make num_folds={num_folds} class-disjoint folds; "
                         f"need at least {num_folds} (lower num_folds or test_fraction)")
    sizes = np.full(num_folds, n // num_folds, dtype=np.int64)
    sizes[: n % num_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [classes[bounds[i]:bounds[i + 1]] for i in range(num_folds)]


def mlrc_fold_groups(classes: np.ndarray, num_folds: int) -> List[np.ndarray]:
    """Validation classes of each fold in the Reality Check's scheme over the sorted ``classes`` (M of them): fold i
    trains on the ``M - floor(M / K)`` classes from position ``s_i = floor(i M / K)`` on and validates on the
    ``floor(M / K)`` after them, positions taken modulo M."""
    m = len(classes)
    n_val = m // num_folds
    if n_val < 1:
        raise ValueError(f"{m} train/val classes cannot make num_folds={num_folds} class-disjoint folds; "
                         f"need at least {num_folds} (lower num_folds or test_fraction)")
    n_train = m - n_val
    groups = []
    for i in range(num_folds):
        start = (i * m) // num_folds
        groups.append(classes[(start + n_train + np.arange(n_val)) % m])
    return groups


SCHEMES = {"default": fold_groups, "mlrc": mlrc_fold_groups}  # dataset.split -> validation groups of the folds


def _groups(scheme: str, classes: np.ndarray, num_folds: int) -> List[np.ndarray]:
    if scheme not in SCHEMES:
        raise ConfigError(f"dataset.split {scheme!r} is not a split scheme; schemes are {', '.join(SCHEMES)} "
                          f"(docs/data.md, 'Splits')")
    return SCHEMES[scheme](classes, num_folds)


def _folds_over(labels: np.ndarray, candidates: np.ndarray, groups: List[np.ndarray]):
    """(train, val) index arrays: fold i validates on ``groups[i]``; indices restricted to ``candidates``."""
    folds = []
    cand_labels = labels[candidates]
    for i, group in enumerate(groups):
        in_val = np.isin(cand_labels, group)
        folds.append((candidates[~in_val].astype(np.int64), candidates[in_val].astype(np.int64)))
    return folds


def class_disjoint_splits(labels, test_fraction: float = 0.5, num_folds: int = 4, scheme: str = "default") -> Split:
    """Test = last ``C - floor(C (1 - test_fraction))`` sorted classes; folds over the rest by ``scheme`` (default:
    contiguous groups; ``mlrc``: the Reality Check's wrapped windows)."""
    _check(test_fraction, num_folds)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    classes = np.unique(labels)  # sorted
    c = len(classes)
    n_trainval = int(math.floor(c * (1.0 - float(test_fraction)) + _EPS))
    if c - n_trainval < 1:
        raise ValueError(f"{c} classes leave no test class with test_fraction={test_fraction}")
    trainval_classes, test_classes = classes[:n_trainval], classes[n_trainval:]
    groups = _groups(scheme, trainval_classes, num_folds)
    all_idx = np.arange(len(labels), dtype=np.int64)
    is_test = np.isin(labels, test_classes)
    folds = _folds_over(labels, all_idx[~is_test], groups)
    return Split(test=all_idx[is_test], folds=folds, test_classes=test_classes.astype(np.int64),
                 fold_classes=[g.astype(np.int64) for g in groups],
                 meta={"test_fraction": float(test_fraction), "num_folds": int(num_folds),
                       "num_classes": int(c), **_scheme_meta(scheme)})


def _scheme_meta(scheme: str) -> Dict[str, Any]:
    """``{"scheme": ...}`` for a scheme other than the default (the default's ``splits.json`` stays as it was)."""
    return {} if scheme == "default" else {"scheme": scheme}


def protocol_splits(dataset, test_fraction: float = 0.5, num_folds: int = 4,
                    scheme: Optional[str] = "default") -> Split:
    """The protocol's split of ``dataset``: its own class-disjoint test set when it ships one, so that numbers compare
    with the literature (SOP: ``test_mask``, the rows of Ebay_test.txt; In-Shop: ``is_query`` / ``is_gallery``, test =
    query + gallery), with the folds over the classes of the remaining images; otherwise
    ``class_disjoint_splits(dataset.labels, ...)`` (sorted halves: CUB 100/100, Cars 98/98). ``scheme``
    (``dataset.split``; None: ``default``) picks how the folds are cut (see the module's docstring)."""
    scheme = scheme or "default"
    labels = np.asarray(dataset.labels)
    is_query = getattr(dataset, "is_query", None)
    is_gallery = getattr(dataset, "is_gallery", None)
    test_mask = getattr(dataset, "test_mask", None)
    query_gallery = is_query is not None and is_gallery is not None
    if not query_gallery and test_mask is None:
        split = class_disjoint_splits(labels, test_fraction, num_folds, scheme)
        split.meta["dataset"] = getattr(dataset, "name", None)
        return split
    _check(test_fraction, num_folds)  # test_fraction unused here, still validated
    all_idx = np.arange(len(labels), dtype=np.int64)
    if query_gallery:
        is_query, is_gallery = np.asarray(is_query, bool), np.asarray(is_gallery, bool)
        is_test = is_query | is_gallery
    else:
        is_test = np.asarray(test_mask, bool)
    train_idx = all_idx[~is_test]
    test_classes = np.unique(labels[is_test])
    trainval_classes = np.unique(labels[train_idx])
    shared = np.intersect1d(test_classes, trainval_classes)
    if len(shared):
        raise ValueError(f"{getattr(dataset, 'name', 'dataset')}: {len(shared)} classes appear both in its test set "
                         f"and in its training images (e.g. {shared[:5].tolist()}); the protocol needs class-disjoint sets")
    groups = _groups(scheme, trainval_classes, num_folds)
    meta = {"num_folds": int(num_folds), "num_classes": int(len(np.unique(labels))),
            "dataset": getattr(dataset, "name", None), "official_test_set": True, **_scheme_meta(scheme)}
    if query_gallery:
        meta["query_gallery"] = True
    return Split(test=all_idx[is_test], folds=_folds_over(labels, train_idx, groups),
                 test_classes=test_classes.astype(np.int64),
                 fold_classes=[g.astype(np.int64) for g in groups],
                 query=all_idx[is_query] if query_gallery else None,
                 gallery=all_idx[is_gallery] if query_gallery else None, meta=meta)


__all__ = ["Split", "class_disjoint_splits", "protocol_splits", "fold_groups", "mlrc_fold_groups", "SCHEMES"]
