"""Base class of every data set, the registry look-up ``get_dataset`` and the cache folder.

A data set is a list of images with integer class labels 0..C-1 (in the data set's own class
order, which the class-disjoint protocol of docs/methods.md (the protocol) splits by). Items are
``{"data": transformed image, "label": int}``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch.utils.data
from PIL import Image

from .transforms import eval_transform

CACHE_ENV = "XML_PLUGIN_CACHE"


def cache_root() -> Path:
    """Folder for built data sets and caches: ``$XML_PLUGIN_CACHE`` if set, else ``~/.cache/xml_plugin``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xml_plugin"


def short_hash(obj: Any, length: int = 12) -> str:
    """Stable hex digest of a JSON-serialisable object (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:length]


class DMLDataset(torch.utils.data.Dataset):
    """Images with class labels for metric learning.

    Subclasses fill ``labels`` (np.int64 [N]), ``class_names`` (C strings), ``paths`` (N image
    files, read lazily) and may set ``is_query`` / ``is_gallery`` (np.bool_ [N]) when the data set
    is evaluated query vs gallery. ``options()`` lists what, besides the file list and labels,
    identifies the content (it goes into ``fingerprint()``).
    """

    name = "dml"

    def __init__(self, transform: Optional[Callable] = None):
        self.transform = transform if transform is not None else eval_transform(224)
        self.labels = np.zeros(0, dtype=np.int64)
        self.class_names: List[str] = []
        self.paths: List[Path] = []
        self.is_query: Optional[np.ndarray] = None
        self.is_gallery: Optional[np.ndarray] = None

    # -- content ------------------------------------------------------------------------------
    def _set_items(self, paths: Sequence[Path], labels: Sequence[int], class_names: Sequence[str]) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if len(paths) != len(labels):
            raise ValueError(f"{self.name}: {len(paths)} image paths but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise ValueError(f"{self.name}: labels must lie in 0..{len(class_names) - 1}")
        self.paths = [Path(p) for p in paths]
        self.labels = labels
        self.class_names = [str(c) for c in class_names]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        """Image ``i`` as an untransformed RGB PIL image (decoded now, not kept)."""
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")

    def __getitem__(self, i: int) -> Dict[str, Any]:
        img = self.image(i)
        return {"data": self.transform(img) if self.transform is not None else img,
                "label": int(self.labels[i])}

    # -- identity -----------------------------------------------------------------------------
    def options(self) -> Dict[str, Any]:
        """Options that change the content (embedded builders: decks, fonts, sizes...)."""
        return {}

    def _relative_paths(self) -> List[str]:
        base = getattr(self, "base_dir", None)
        out = []
        for p in self.paths:
            try:
                out.append(p.relative_to(base).as_posix() if base is not None else p.name)
            except ValueError:
                out.append(p.as_posix())
        return out

    def fingerprint(self) -> str:
        """Short stable key ``<name>-<hash>`` of the name, options, relative file list, labels and
        query/gallery flags; moving the data set to another folder keeps it. The transform is not
        part of it (a feature cache keys its views separately)."""
        h = hashlib.sha1()
        h.update(json.dumps({"name": self.name, "options": self.options(), "classes": self.class_names},
                            sort_keys=True, default=str).encode("utf-8"))
        h.update("\n".join(self._relative_paths()).encode("utf-8"))
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        for flags in (self.is_query, self.is_gallery):
            if flags is not None:
                h.update(np.packbits(np.asarray(flags, dtype=bool)).tobytes())
        return f"{self.name}-{h.hexdigest()[:12]}"

    def __repr__(self) -> str:
        qg = ""
        if self.is_query is not None:
            qg = f", query={int(np.sum(self.is_query))}, gallery={int(np.sum(self.is_gallery))}"
        return f"{type(self).__name__}(name={self.name!r}, images={len(self)}, classes={self.num_classes}{qg})"


def _import_builtin_datasets() -> None:
    # registering happens at import; importing here keeps get_dataset usable on its own
    from . import csv_dataset, embedded, real  # noqa: F401


def get_dataset(name: str, root: Optional[str] = None, transform: Optional[Callable] = None,
                **options: Any) -> DMLDataset:
    """Build the data set registered (kind ``"dataset"``) as ``name`` from ``root`` with ``options``."""
    from ..registry import build

    _import_builtin_datasets()
    # build() names the valid options when one is unknown
    return build("dataset", name, root=root, transform=transform, **options)


__all__ = ["DMLDataset", "get_dataset", "cache_root", "short_hash", "CACHE_ENV"]

from . import csv_dataset  # noqa: E402,F401  (registers csv: a data set from an open-metric-learning CSV)
