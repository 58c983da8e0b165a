"""A data set described by one CSV file in open-metric-learning's format (``--dataset csv --dataset_root my.csv``).

Columns: ``label`` and ``path`` (relative to the CSV's folder, or absolute) are required; ``split``
(``train`` / ``validation``), ``is_query`` and ``is_gallery`` are optional, other columns are ignored. Labels are
renumbered 0..C-1 in sorted label order. With a class-disjoint ``split`` column the ``validation`` rows are the
protocol's test set (``test_mask``), and ``is_query`` / ``is_gallery`` on them make it a query-vs-gallery test like
In-Shop; without it the protocol splits the sorted classes itself.
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from ..config import ConfigError
from ..registry import register
from .datasets import DMLDataset

REQUIRED = ("label", "path")
SPLITS = ("train", "validation")
TRUE, FALSE = ("1", "true", "1.0", "yes"), ("0", "false", "0.0", "no", "")


def _flag(value: str, column: str, row: int, csv_path: Path) -> bool:
    v = (value or "").strip().lower()
    if v in TRUE:
        return True
    if v in FALSE or v == "nan":
        return False
    raise ConfigError(f"{csv_path}: row {row} has {column} = {value!r}; use True/False or 1/0")


def read_rows(csv_path: Path) -> List[Dict[str, str]]:
    """The CSV's rows as dicts; a missing file or a missing required column is a ConfigError."""
    if not csv_path.is_file():
        raise ConfigError(f"--dataset csv needs --dataset_root pointing at a CSV file; {csv_path} does not exist")
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED if c not in columns]
            if missing:
                raise ConfigError(f"{csv_path} has no column {missing[0]!r} (columns found: "
                                  f"{', '.join(columns) or 'none'}); a data set CSV needs the columns label and path, "
                                  f"optionally split, is_query, is_gallery")
            reader.fieldnames = columns
            return [r for r in reader if any((v or "").strip() for v in r.values())]
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{csv_path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise ConfigError(f"{csv_path} is not a readable CSV file ({exc}); one row per image, columns label, path")


def unreadable_images(paths: List[Path]) -> List[Path]:
    """The files that are not images PIL can identify (their header is read, not the pixels)."""
    from PIL import Image, UnidentifiedImageError
    bad = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.size  # noqa: B018 - the header is parsed
        except (UnidentifiedImageError, OSError, ValueError):
            bad.append(p)
    return bad


class CSVDataset(DMLDataset):
    """Images listed in an open-metric-learning style CSV (label, path[, split, is_query, is_gallery])."""

    name = "csv"

    def __init__(self, root=None, transform: Optional[Callable] = None, check_files: bool = True):
        super().__init__(transform)
        if root is None:
            raise ConfigError("--dataset csv needs --dataset_root pointing at the CSV file (columns label, path, ...)")
        self.csv_path = Path(root).expanduser().resolve()
        self.base_dir = self.csv_path.parent
        rows = read_rows(self.csv_path)
        if not rows:
            raise ConfigError(f"{self.csv_path} has no rows")
        paths = [Path(r["path"].strip()) for r in rows]
        paths = [p if p.is_absolute() else self.base_dir / p for p in paths]
        if check_files:
            absent = [p for p in paths if not p.is_file()]
            if absent:
                raise ConfigError(f"{self.csv_path}: {len(absent)} image file(s) listed in column path do not exist, "
                                  f"e.g. {absent[0]} (paths are relative to the CSV's folder)")
            bad = unreadable_images(paths)
            if bad:
                raise ConfigError(f"{self.csv_path}: {len(bad)} file(s) listed in column path are not images that can "
                                  f"be decoded, e.g. {bad[0]}: remove those rows or convert the files (JPEG, PNG ...)")
        raw = [r["label"].strip() for r in rows]
        try:
            keys = [int(v) for v in raw]
        except ValueError:
            keys = raw  # string labels sort as strings
        uniq, labels, counts = np.unique(np.asarray(keys), return_inverse=True, return_counts=True)
        if (counts < 2).any():
            lone = uniq[counts < 2]
            raise ConfigError(f"{self.csv_path}: {len(lone)} class(es) have a single image (e.g. label "
                              f"{lone[0]}); metric learning needs at least 2 images per class: remove those rows")
        self._set_items(paths, labels.reshape(-1), [str(u) for u in uniq])
        self.uses_split_column = False
        if "split" in rows[0]:
            self._use_split_column(rows)

    def _use_split_column(self, rows: List[Dict[str, str]]) -> None:
        split = np.asarray([(r.get("split") or "").strip() for r in rows])
        bad = sorted(set(split) - set(SPLITS))
        if bad:
            raise ConfigError(f"{self.csv_path}: column split holds {bad[0]!r}; use train or validation")
        test = split == "validation"
        shared = np.intersect1d(self.labels[test], self.labels[~test])
        if not test.any() or test.all() or len(shared):
            why = (f"{len(shared)} classes have images in both train and validation (e.g. "
                   f"{self.class_names[shared[0]]})" if len(shared) else "it holds only one of train / validation")
            warnings.warn(f"{self.csv_path}: the split column is not a class-disjoint train/test split ({why}); "
                          f"the protocol splits the sorted classes itself instead", stacklevel=3)
            return
        self.uses_split_column = True
        self.test_mask = test
        if "is_query" in rows[0] and "is_gallery" in rows[0]:
            q = np.asarray([_flag(r["is_query"], "is_query", i + 2, self.csv_path) if test[i] else False
                            for i, r in enumerate(rows)])
            g = np.asarray([_flag(r["is_gallery"], "is_gallery", i + 2, self.csv_path) if test[i] else False
                            for i, r in enumerate(rows)])
            if (q & g)[test].all():
                return  # every test image is both: the test set against itself (each query left out of its gallery)
            if (q & g).any():
                raise ConfigError(f"{self.csv_path}: some validation rows are both query and gallery and others not; "
                                  f"mark each validation row as query or gallery, or every row as both")
            if (test & ~(q | g)).any():
                raise ConfigError(f"{self.csv_path}: {int((test & ~(q | g)).sum())} validation rows are neither "
                                  f"query nor gallery; set is_query or is_gallery on each")
            self.is_query, self.is_gallery = q, g

    def options(self) -> Dict[str, object]:
        return {"csv": self.csv_path.name, "split_column": self.uses_split_column}


register("dataset", CSVDataset, name="csv", aliases=["oml_csv"])

__all__ = ["CSVDataset", "read_rows"]
