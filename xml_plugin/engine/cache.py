"""Frozen-trunk feature cache: the frozen part's outputs for a fixed number of augmented views per image.

Built once per (data set, trunk weights, frozen blocks, transforms, views) key into ``<cache>/features/<key>/``
and reused across runs, folds and trials. ``eval.npy`` [N, C, h, w] holds the test-transform view,
``train.npy`` [N, V, C, h, w] the augmented views, both float16. The build writes into a temporary folder
that is renamed when complete, so a killed build is started again, never half-used.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .io import atomic_write_json, read_json, stable_hash

CACHE_VERSION = 1


class _Views(torch.utils.data.Dataset):
    """Image i -> [1 + V, 3, H, W]: the eval view then V seeded augmented views."""

    def __init__(self, dataset, train_tf, eval_tf, views: int, seed: int):
        self.dataset, self.train_tf, self.eval_tf, self.views, self.seed = dataset, train_tf, eval_tf, views, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = self.dataset.image(i)
        out = [self.eval_tf(img)]
        gen_state = torch.get_rng_state()
        for v in range(self.views):
            torch.manual_seed(self.seed * 1_000_003 + i * 131 + v)  # view v of image i is the same on every machine
            out.append(self.train_tf(img))
        torch.set_rng_state(gen_state)
        return torch.stack(out)


class FeatureCache:
    """Cached outputs of ``frozen`` for every image of ``dataset``; see the module docstring."""

    def __init__(self, folder: Path, key_info: Dict[str, Any]):
        self.key = stable_hash({**key_info, "version": CACHE_VERSION})
        self.folder = Path(folder) / "features" / self.key
        self.key_info = key_info
        self._eval: Optional[np.ndarray] = None
        self._train: Optional[np.ndarray] = None

    @property
    def complete(self) -> bool:
        return (self.folder / "meta.json").is_file()

    def build(self, dataset, frozen: nn.Module, train_tf, eval_tf, views: int, device: torch.device,
              batch_size: int = 32, num_workers: int = 0, seed: int = 0, progress: bool = True) -> "FeatureCache":
        if self.complete:
            return self.load()
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self._remove_dead_builds()
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.key}.{os.getpid()}.", dir=self.folder.parent))
        try:
            loader = torch.utils.data.DataLoader(_Views(dataset, train_tf, eval_tf, views, seed), batch_size=max(1, batch_size // (views + 1)),
                                                 shuffle=False, num_workers=num_workers)
            frozen = frozen.to(device).eval()
            n = len(dataset)
            eval_mm = train_mm = None
            pos = 0
            with torch.no_grad(), tqdm(total=n * (views + 1), desc="caching features", unit="img",
                                       disable=not progress, leave=False) as bar:
                for batch in loader:  # [b, 1+V, 3, H, W]
                    b = batch.shape[0]
                    feats = frozen(batch.flatten(0, 1).to(device)).float().cpu()  # [b*(1+V), C, h, w]
                    feats = feats.view(b, views + 1, *feats.shape[1:]).numpy().astype(np.float16)
                    if eval_mm is None:
                        shape = feats.shape[2:]
                        eval_mm = np.lib.format.open_memmap(tmp / "eval.npy", mode="w+", dtype=np.float16, shape=(n, *shape))
                        train_mm = np.lib.format.open_memmap(tmp / "train.npy", mode="w+", dtype=np.float16,
                                                             shape=(n, views, *shape))
                    eval_mm[pos:pos + b] = feats[:, 0]
                    train_mm[pos:pos + b] = feats[:, 1:]
                    pos += b
                    bar.update(b * (views + 1))
            if eval_mm is None:
                raise ValueError("cannot cache features of an empty data set")
            eval_mm.flush()
            train_mm.flush()
            del eval_mm, train_mm
            atomic_write_json(tmp / "meta.json", {"key_info": self.key_info, "n": n, "views": views})
            try:
                os.replace(tmp, self.folder)
            except OSError:  # another worker finished the same cache first: use theirs
                if not self.complete:
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self.load()

    def _remove_dead_builds(self) -> None:
        """Delete temporary folders of builds whose process is gone (killed with -9: no clean-up ran)."""
        for tmp in self.folder.parent.glob(f".{self.key}.*"):
            try:
                pid = int(tmp.name.split(".")[2])
                os.kill(pid, 0)
            except ProcessLookupError:
                shutil.rmtree(tmp, ignore_errors=True)
            except (ValueError, IndexError, PermissionError):
                continue

    def load(self) -> "FeatureCache":
        self._eval = np.load(self.folder / "eval.npy", mmap_mode="r")
        self._train = np.load(self.folder / "train.npy", mmap_mode="r")
        meta = read_json(self.folder / "meta.json")
        self.views = int(meta["views"])
        # small enough: keep in memory for fast random access during training
        if self._train.nbytes + self._eval.nbytes < int(os.environ.get("XML_PLUGIN_CACHE_RAM_BYTES", 8 << 30)):
            self._eval, self._train = np.ascontiguousarray(self._eval), np.ascontiguousarray(self._train)
        return self

    def eval_features(self, indices) -> torch.Tensor:
        # float16 -> float32 in torch (vectorised), not numpy (element by element: 6x slower)
        return torch.from_numpy(np.ascontiguousarray(self._eval[indices])).float()

    def train_features(self, indices, views) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._train[indices, views])).float()

    @property
    def feature_shape(self):
        return tuple(self._eval.shape[1:])
