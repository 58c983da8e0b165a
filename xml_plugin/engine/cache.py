"""Frozen-trunk feature cache: the frozen part's outputs for a fixed number of augmented views per image.

Built once per (data set, trunk weights, frozen blocks, transforms, views) key into ``<cache>/features/<key>/``
and reused across runs, folds and trials. ``eval.npy`` [N, C, h, w] holds the test-transform view,
``train.npy`` [N, V, C, h, w] the augmented views, both float16. A pooled cache keeps one vector per view, the
spatial mean of the frozen part's output (``eval.npy`` [N, C], ``train.npy`` [N, V, C], h*w times smaller): enough for
methods whose trained part is a linear embedder and GAP, since GAP commutes with a linear map. The build writes into a
temporary folder that is renamed when complete, so a killed build is started again, never half-used.

Integrity: ``meta.json`` records each array file's size, shape, dtype and SHA-256. A process verifies them once when it
first opens the cache (1.2 s for the 530 MB `cards` cache, docs/protocol.md); a cache that fails the check (truncated,
overwritten, zeroed) is removed and built again, with a warning naming its folder, so that a damaged cache never gives
a different number.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import registry
from ..config import ConfigError, is_search_marker
from .io import DamagedFileError, atomic_write_json, file_checksum, read_json_checked, stable_hash

CACHE_VERSION = 1
ARRAYS = ("eval.npy", "train.npy")
POOLED_COPIES = ("eval_pooled.npy", "train_pooled.npy")  # a full cache's spatial means, float32 [N, C], [N, V, C]
_VERIFIED: Dict[str, tuple] = {}  # cache folder -> its files' (size, mtime) when this process verified them


def write_pooled_copy(folder: Path, chunk: int = 64) -> Dict[str, Dict[str, Any]]:
    """``eval_pooled.npy`` / ``train_pooled.npy``: the spatial mean of every cached map, averaged in float32 from the
    stored float16 maps (what GAP computes from them), so that GAP methods read [C] vectors instead of [C, h, w] maps.
    Written next to the maps; returns their :func:`array_record`."""
    out = {}
    for src, dst in zip(ARRAYS, POOLED_COPIES):
        maps = np.load(folder / src, mmap_mode="r")  # [N, C, h, w] or [N, V, C, h, w]
        tmp = folder / f".{dst}.{os.getpid()}.tmp"
        pooled = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=maps.shape[:-2])
        for start in range(0, len(maps), chunk):
            block = torch.from_numpy(np.array(maps[start:start + chunk]))  # a writable copy
            pooled[start:start + chunk] = block.float().mean(dim=(-2, -1)).numpy()
        pooled.flush()
        del pooled
        os.replace(tmp, folder / dst)
        out[dst] = array_record(folder / dst)
    return out


def _stamp(folder: Path) -> tuple:
    """The sizes and modification times of a cache's files: a file changed since it was verified is verified again."""
    out = []
    for name in ("meta.json", *ARRAYS, *POOLED_COPIES):
        try:
            st = (folder / name).stat()
            out.append((st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def array_record(path: Path) -> Dict[str, Any]:
    """What ``meta.json`` records of an array file: size in bytes, shape, dtype and SHA-256."""
    arr = np.load(path, mmap_mode="r")
    return {"bytes": path.stat().st_size, "shape": list(arr.shape), "dtype": str(arr.dtype),
            "sha256": file_checksum(path)}


def verify_arrays(folder: Path, records: Dict[str, Dict[str, Any]]) -> None:
    """Raise :class:`DamagedFileError` for the first array file of ``folder`` whose size, shape, dtype or checksum
    differs from ``records`` (sizes first: a truncated file is found without reading it)."""
    for name in (*ARRAYS, *[n for n in POOLED_COPIES if n in records]):
        path, rec = folder / name, records.get(name)
        if rec is None:
            raise DamagedFileError(path, "meta.json records no checksum for it")
        if not path.is_file():
            raise DamagedFileError(path, "the file is missing")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise DamagedFileError(path, f"{size} bytes where {rec['bytes']} were written")
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError as exc:
            raise DamagedFileError(path, f"not a .npy array ({exc})") from None
        if list(arr.shape) != rec["shape"] or str(arr.dtype) != rec["dtype"]:
            raise DamagedFileError(path, f"shape {list(arr.shape)} {arr.dtype} where {rec['shape']} {rec['dtype']} "
                                         f"were written")
        if file_checksum(path) != rec["sha256"]:
            raise DamagedFileError(path, "its content differs from what was written (checksum mismatch)")
POOLED_POOLINGS = ("gap",)  # poolings that commute with a linear embedder
LINEAR_EMBEDDERS = ("conv1x1", "none")


def cache_bytes(n: int, views: int, feature_shape: Sequence[int], pooled: bool) -> int:
    """Bytes on disk of a float16 cache of ``n`` images, each ``1 + views`` maps of ``feature_shape`` [C, h, w]."""
    per_view = int(feature_shape[0]) if pooled else int(np.prod(feature_shape))
    return 2 * int(n) * (1 + int(views)) * per_view


def _canonical(kind: str, spec: Any) -> Optional[str]:
    if not spec or is_search_marker(spec):
        return None
    name = registry.split_spec(spec)[0]
    try:
        return registry.canonical_name(kind, name) if isinstance(name, str) else None
    except registry.UnknownComponentError:
        return None


def can_use_pooled(method_cfg: Dict[str, Any]) -> bool:
    """Does this method's trained head see the frozen map only through "linear embedder, then GAP"?"""
    return (_canonical("pooling", method_cfg.get("pooling")) in POOLED_POOLINGS
            and _canonical("embedder", method_cfg.get("embedder")) in LINEAR_EMBEDDERS)


def pooled_choice(method_cfgs: Iterable[Dict[str, Any]], frozen_blocks: int, num_blocks: int, pooled: Any = "auto") -> bool:
    """Does the cache keep one pooled vector per view (``cache.pooled`` auto: when every method can use it)?"""
    poolable = frozen_blocks == num_blocks and all(can_use_pooled(m) for m in method_cfgs)
    if pooled in ("auto", None):
        return poolable
    if pooled is True:
        if not poolable:
            raise ConfigError("cache.pooled is true, but a pooled cache only serves methods that train nothing but a "
                              "linear embedder and GAP with the whole trunk frozen; set cache.pooled to auto or false")
        return True
    if pooled is False:
        return False
    raise ConfigError(f"cache.pooled must be auto, true or false, got {pooled!r}")


def cache_plan(method_cfgs: Iterable[Dict[str, Any]], frozen_blocks: int, num_blocks: int, n_images: int, views: int,
               feature_shape: Sequence[int], pooled: Any = "auto", free_bytes: Optional[int] = None,
               ram_bytes: Optional[int] = None, ram_fraction: float = 0.25) -> Dict[str, Any]:
    """Pooled or full cache, its size, and whether it is loaded in RAM (else memory-mapped; several workers then share
    the page cache). ``free_bytes`` (None: not checked) below the size is a ConfigError saying how to fix it."""
    use_pooled = pooled_choice(method_cfgs, frozen_blocks, num_blocks, pooled)
    if not 0 < float(ram_fraction) <= 1:
        raise ConfigError(f"cache.ram_fraction must be in (0, 1], got {ram_fraction!r}")
    size = cache_bytes(n_images, views, feature_shape, use_pooled)
    if free_bytes is not None and size > free_bytes:
        hints = "a folder on a larger disk (cache.folder), fewer views (cache.views)"
        hints += ", fewer frozen trunk blocks (trunk.frozen_blocks)" if use_pooled else \
            ", a pooled cache (cache.pooled: true, GAP methods only) or fewer frozen trunk blocks (trunk.frozen_blocks)"
        raise ConfigError(f"the feature cache needs {_gb(size)} ({size} bytes) but only {_gb(free_bytes)} "
                          f"({free_bytes} bytes) are free; use {hints}")
    in_ram = ram_bytes is None or size <= float(ram_fraction) * ram_bytes
    return {"pooled": use_pooled, "bytes": size, "in_ram": in_ram}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def free_disk_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds ``folder`` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def machine_ram_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


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

    @classmethod
    def planned(cls, folder: Path, key_info: Dict[str, Any], dataset, frozen: nn.Module, train_tf, eval_tf, views: int,
                device: torch.device, method_cfgs: Iterable[Dict[str, Any]], num_blocks: int,
                cache_cfg: Dict[str, Any], progress: bool = True) -> "FeatureCache":
        """The cache that :func:`cache_plan` picks (pooled or full, in RAM or memory-mapped), built if missing after
        its size was printed and checked against the free disk space."""
        with torch.no_grad():  # one eval view through the frozen part: the shape of every cached map
            shape = tuple(frozen.to(device).eval()(eval_tf(dataset.image(0))[None].to(device)).shape[1:])
        plan = cache_plan(method_cfgs, key_info["frozen_blocks"], num_blocks, len(dataset), views, shape,
                          cache_cfg.get("pooled", "auto"), ram_bytes=machine_ram_bytes(),
                          ram_fraction=float(cache_cfg.get("ram_fraction", 0.25)))
        cache = cls(folder, {**key_info, "pooled": True} if plan["pooled"] else key_info)
        if not cache.complete:
            cache_plan(method_cfgs, key_info["frozen_blocks"], num_blocks, len(dataset), views, shape,
                       plan["pooled"], free_bytes=free_disk_bytes(folder), ram_fraction=float(cache_cfg.get(
                           "ram_fraction", 0.25)))
        return cache.build(dataset, frozen, train_tf, eval_tf, views, device, int(cache_cfg.get("batch_size", 32)),
                           seed=int(cache_cfg.get("seed", 0)), progress=progress, pooled=plan["pooled"],
                           in_ram=plan["in_ram"], size_bytes=plan["bytes"])

    @property
    def complete(self) -> bool:
        return (self.folder / "meta.json").is_file()

    def build(self, dataset, frozen: nn.Module, train_tf, eval_tf, views: int, device: torch.device,
              batch_size: int = 32, num_workers: int = 0, seed: int = 0, progress: bool = True,
              pooled: bool = False, in_ram: Optional[bool] = None, size_bytes: Optional[int] = None) -> "FeatureCache":
        """Compute (unless already complete and intact) and load; ``pooled``: keep the spatial mean of each map only.
        A complete cache that fails its integrity check is removed and built again."""
        if self.complete:
            try:
                return self.load(in_ram)
            except DamagedFileError as exc:
                print(f"warning: the feature cache {self.folder} is damaged ({exc.path.name}: {exc.reason}); it is "
                      f"removed and built again", file=sys.stderr)
                self._discard()
        if size_bytes is not None:
            print(f"xml_plugin: building the {'pooled ' if pooled else ''}feature cache of {len(dataset)} images x "
                  f"{1 + views} views: {_gb(size_bytes)} in {self.folder}", file=sys.stderr)
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
                    if pooled:
                        feats = feats.mean(dim=(2, 3))  # [b*(1+V), C]
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
            records = {a: array_record(tmp / a) for a in ARRAYS}
            if not pooled:
                records.update(write_pooled_copy(tmp))
            atomic_write_json(tmp / "meta.json", {"key_info": self.key_info, "n": n, "views": views, "pooled": pooled,
                                                  "arrays": records})
            try:
                os.replace(tmp, self.folder)
                _VERIFIED[str(self.folder)] = _stamp(self.folder)  # checksummed just now
            except OSError:  # another worker finished the same cache first: use theirs
                if not self.complete:
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self.load(in_ram)

    def _discard(self) -> None:
        """Remove this (damaged) cache: renamed first, so that no process opens it while it is deleted."""
        trash = self.folder.parent / f".{self.key}.damaged.{os.getpid()}"
        try:
            os.replace(self.folder, trash)
        except OSError:
            return  # another worker moved it first
        shutil.rmtree(trash, ignore_errors=True)
        _VERIFIED.pop(str(self.folder), None)

    def verify(self) -> Dict[str, Any]:
        """``meta.json``, after checking the array files against it once per process (:func:`verify_arrays`); a cache
        written before checksums were recorded gets them now."""
        meta_path = self.folder / "meta.json"
        meta = read_json_checked(meta_path)
        if not isinstance(meta, dict) or "views" not in meta:
            raise DamagedFileError(meta_path, "not a feature cache's meta.json")
        if _VERIFIED.get(str(self.folder)) == _stamp(self.folder):
            return meta
        if "arrays" not in meta:  # an older cache: record what it holds now
            meta["arrays"] = {a: array_record(self.folder / a) for a in ARRAYS}
            atomic_write_json(meta_path, meta)
        verify_arrays(self.folder, meta["arrays"])
        if not meta.get("pooled") and not all(n in meta["arrays"] for n in POOLED_COPIES):
            meta["arrays"].update(write_pooled_copy(self.folder))  # a full cache made before the pooled copies
            atomic_write_json(meta_path, meta)
        _VERIFIED[str(self.folder)] = _stamp(self.folder)
        return meta

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

    def load(self, in_ram: Optional[bool] = None) -> "FeatureCache":
        """Open the arrays: read into RAM (``in_ram``; None: when under a quarter of the machine's RAM), else
        memory-mapped. Raises :class:`DamagedFileError` when the files fail :meth:`verify`."""
        meta = self.verify()
        self._eval = np.load(self.folder / "eval.npy", mmap_mode="r")
        self._train = np.load(self.folder / "train.npy", mmap_mode="r")
        self._eval_pooled = self._train_pooled = None
        if not meta.get("pooled") and all(n in meta["arrays"] for n in POOLED_COPIES):
            self._eval_pooled = np.load(self.folder / POOLED_COPIES[0], mmap_mode="r")
            self._train_pooled = np.load(self.folder / POOLED_COPIES[1], mmap_mode="r")
        self.views = int(meta["views"])
        self.pooled = bool(meta.get("pooled", False))
        if in_ram is None:
            ram = machine_ram_bytes()
            in_ram = ram is None or self._train.nbytes + self._eval.nbytes <= ram / 4
        if in_ram:  # fast random access during training
            self._eval, self._train = np.ascontiguousarray(self._eval), np.ascontiguousarray(self._train)
            if self._eval_pooled is not None:
                self._eval_pooled = np.ascontiguousarray(self._eval_pooled)
                self._train_pooled = np.ascontiguousarray(self._train_pooled)
        return self

    @property
    def has_pooled_copy(self) -> bool:
        """A full-map cache that also holds the maps' spatial means (see :func:`write_pooled_copy`)."""
        return getattr(self, "_eval_pooled", None) is not None

    def eval_features(self, indices, pooled: bool = False) -> torch.Tensor:
        """Float32 inputs of the test-transform views: maps [n, C, h, w] (or the cache's pooled [n, C]); with
        ``pooled``, a full cache's pooled copy [n, C]."""
        if pooled and self.has_pooled_copy:
            return torch.from_numpy(np.ascontiguousarray(self._eval_pooled[indices]))
        # float16 -> float32 in torch (vectorised), not numpy (element by element: 6x slower)
        return torch.from_numpy(np.ascontiguousarray(self._eval[indices])).float()

    def train_features(self, indices, views, pooled: bool = False) -> torch.Tensor:
        if pooled and self.has_pooled_copy:
            return torch.from_numpy(np.ascontiguousarray(self._train_pooled[indices, views]))
        return torch.from_numpy(np.ascontiguousarray(self._train[indices, views])).float()

    @property
    def feature_shape(self):
        return tuple(self._eval.shape[1:])
