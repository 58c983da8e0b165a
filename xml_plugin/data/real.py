"""Loaders for the four real benchmarks in their distributed formats (docs/data.md): CUB-200-2011,
Cars196, Stanford Online Products and In-Shop Clothes.

Classes are numbered over ALL images (the protocol splits by class itself); In-Shop also keeps
its query/gallery partition. Images are decoded lazily with PIL.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..registry import register
from .datasets import DMLDataset, cache_root

_LAYOUTS = {
    "cub200": ("CUB-200-2011", """\
  <root>/CUB_200_2011/images.txt               <image_id> <relative path>
  <root>/CUB_200_2011/image_class_labels.txt   <image_id> <class_id 1..200>
  <root>/CUB_200_2011/classes.txt              <class_id> <class name>
  <root>/CUB_200_2011/images/<NNN.Class_Name>/*.jpg
(<root> may also be the CUB_200_2011 folder itself)"""),
    "cars196": ("Cars196", """\
  <root>/cars_annos.mat    struct array 'annotations' (relative_im_path, class 1..196, test), 'class_names'
  <root>/car_ims/*.jpg"""),
    "sop": ("Stanford Online Products", """\
  <root>/Stanford_Online_Products/Ebay_train.txt   image_id class_id super_class_id path
  <root>/Stanford_Online_Products/Ebay_test.txt
  <root>/Stanford_Online_Products/<category>_final/*.JPG
(<root> may also be the Stanford_Online_Products folder itself)"""),
    "inshop": ("In-Shop Clothes", """\
  <root>/list_eval_partition.txt   line 1: row count; line 2: image_name item_id evaluation_status
  <root>/img/<GENDER>/<Category>/<item_id>/*.jpg"""),
}


def _missing(key: str, what: Path, root: Path) -> FileNotFoundError:
    title, layout = _LAYOUTS[key]
    return FileNotFoundError(
        f"{title} not found: expected {what} (data set root: {root}).\n"
        f"Expected layout:\n{layout}\n"
        f"Download the data set and pass the folder <root> with --dataset_root.")


def _default_root(root) -> Path:
    return Path(root).expanduser() if root is not None else cache_root() / "datasets"


def _find_base(key: str, root: Path, subdir: str, marker: str) -> Path:
    """``root/subdir`` if it holds ``marker``, else ``root`` itself if it does."""
    for base in (root / subdir, root):
        if (base / marker).is_file():
            return base
    raise _missing(key, root / subdir / marker, root)


def _require(key: str, path: Path, root: Path, folder: bool = False) -> Path:
    if not (path.is_dir() if folder else path.is_file()):
        raise _missing(key, path, root)
    return path


def _read_rows(path: Path, skip: int = 0) -> List[List[str]]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()[skip:]
    return [ln.split() for ln in lines if ln.strip()]


def _renumber(raw_ids: Sequence) -> Tuple[np.ndarray, list]:
    """Map ids to 0..C-1 in sorted id order; returns (labels, sorted unique ids)."""
    uniq, labels = np.unique(np.asarray(raw_ids), return_inverse=True)
    return labels.astype(np.int64).reshape(-1), uniq.tolist()


class _RealDataset(DMLDataset):
    def __init__(self, transform: Optional[Callable] = None):
        super().__init__(transform)
        self.root: Optional[Path] = None


class CUB200(_RealDataset):
    """CUB-200-2011: 11,788 bird images, 200 classes (class_id 1..200 -> label 0..199)."""

    name = "cub200"

    def __init__(self, root=None, transform: Optional[Callable] = None):
        super().__init__(transform)
        self.root = _default_root(root)
        base = _find_base(self.name, self.root, "CUB_200_2011", "images.txt")
        self.base_dir = base
        labels_file = _require(self.name, base / "image_class_labels.txt", self.root)
        classes_file = _require(self.name, base / "classes.txt", self.root)
        images_dir = _require(self.name, base / "images", self.root, folder=True)
        paths = {r[0]: r[1] for r in _read_rows(base / "images.txt")}
        cls_of = {r[0]: int(r[1]) for r in _read_rows(labels_file)}
        missing = [i for i in paths if i not in cls_of]
        if missing:
            raise ValueError(f"{labels_file} has no class for image id(s) {missing[:5]}")
        names = {int(r[0]): " ".join(r[1:]) for r in _read_rows(classes_file)}
        ids = sorted(paths, key=int)
        labels, class_ids = _renumber([cls_of[i] for i in ids])
        self._set_items([images_dir / paths[i] for i in ids], labels,
                        [names.get(int(c), str(c)) for c in class_ids])


class Cars196(_RealDataset):
    """Cars196: 16,185 car images, 196 classes, read from ``cars_annos.mat``."""

    name = "cars196"

    def __init__(self, root=None, transform: Optional[Callable] = None):
        import scipy.io

        super().__init__(transform)
        self.root = _default_root(root)
        mat_path = _require(self.name, self.root / "cars_annos.mat", self.root)
        _require(self.name, self.root / "car_ims", self.root, folder=True)
        self.base_dir = self.root
        mat = scipy.io.loadmat(str(mat_path), squeeze_me=True, struct_as_record=True)
        if "annotations" not in mat:
            raise ValueError(f"{mat_path} has no 'annotations' struct array")
        ann = np.atleast_1d(mat["annotations"])
        rel = [str(p) for p in np.atleast_1d(ann["relative_im_path"])]
        raw = np.atleast_1d(ann["class"]).astype(np.int64)
        labels, class_ids = _renumber(raw)
        names = [str(n) for n in np.atleast_1d(mat["class_names"])] if "class_names" in mat else []
        class_names = [names[c - 1] if 0 < c <= len(names) else str(c) for c in class_ids]
        self.is_official_test = np.atleast_1d(ann["test"]).astype(bool) if "test" in ann.dtype.names else None
        self._set_items([self.root / p for p in rel], labels, class_names)


class StanfordOnlineProducts(_RealDataset):
    """Stanford Online Products: 120,053 images of 22,634 products; Ebay_train.txt and
    Ebay_test.txt pooled, class_id renumbered 0..C-1 in class_id order; ``test_mask`` marks the rows of
    Ebay_test.txt (the official class-disjoint test set, which the protocol uses)."""

    name = "sop"

    def __init__(self, root=None, transform: Optional[Callable] = None):
        super().__init__(transform)
        self.root = _default_root(root)
        base = _find_base(self.name, self.root, "Stanford_Online_Products", "Ebay_train.txt")
        _require(self.name, base / "Ebay_test.txt", self.root)
        self.base_dir = base
        rows = []
        for part in ("Ebay_train.txt", "Ebay_test.txt"):  # header: image_id class_id super_class_id path
            rows += [(*r[:4], part == "Ebay_test.txt") for r in _read_rows(base / part, skip=1)]
        rows.sort(key=lambda r: int(r[0]))
        # the official class-disjoint split (11,318 / 11,316 classes): the protocol's test set (data/splits.py)
        self.test_mask = np.asarray([r[4] for r in rows], dtype=bool)
        labels, class_ids = _renumber([int(r[1]) for r in rows])
        super_of = {int(r[1]): int(r[2]) for r in rows}
        self.super_labels = np.asarray([int(r[2]) - 1 for r in rows], dtype=np.int64)
        category = {int(r[2]): r[3].split("/")[0].replace("_final", "") for r in rows}
        class_names = [f"{category[super_of[c]]}/{c}" for c in class_ids]
        self._set_items([base / r[3] for r in rows], labels, class_names)


class InShop(_RealDataset):
    """In-Shop Clothes retrieval: 52,712 images of 7,982 items; item ids renumbered 0..C-1 in
    sorted id order; ``is_train`` / ``is_query`` / ``is_gallery`` from the partition file."""

    name = "inshop"

    def __init__(self, root=None, transform: Optional[Callable] = None):
        super().__init__(transform)
        self.root = _default_root(root)
        part = _require(self.name, self.root / "list_eval_partition.txt", self.root)
        self.base_dir = self.root
        rows = _read_rows(part, skip=2)  # line 1: row count; line 2: header
        bad = [" ".join(r) for r in rows if len(r) != 3 or r[2] not in ("train", "query", "gallery")]
        if bad:
            raise ValueError(f"{part}: rows must be 'image_name item_id train|query|gallery', "
                             f"found {len(bad)} bad row(s), e.g. {bad[:3]}")
        labels, item_ids = _renumber([r[1] for r in rows])
        status = np.asarray([r[2] for r in rows])
        self.is_train = status == "train"
        self.is_query = status == "query"
        self.is_gallery = status == "gallery"
        self._set_items([self.root / r[0] for r in rows], labels, item_ids)


register("dataset", CUB200, name="cub200", aliases=["cub", "cub_200_2011"])
register("dataset", Cars196, name="cars196", aliases=["cars"])
register("dataset", StanfordOnlineProducts, name="sop", aliases=["stanford_online_products", "online_products"])
register("dataset", InShop, name="inshop", aliases=["in_shop", "deepfashion_inshop"])

__all__ = ["CUB200", "Cars196", "StanfordOnlineProducts", "InShop"]
