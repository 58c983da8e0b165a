"""The resolved state of one experiment, at the bottom of ``protocol/``: every method's config, the storage, the data
set, its class-disjoint split and the feature cache (``setup``), the run folders and the call that trains one fold.
Identity, search and reproductions take this state; nothing here imports them."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import config as C
from .. import registry
from ..engine import distributed as D
from ..engine import train as T
from ..engine.cache import FeatureCache, can_use_pooled, pooled_choice
from ..engine.io import stable_hash
from ..engine.model import build_trunk, frozen_blocks
from . import slots
from .checks import check_components, check_numbers
from .configs import METHOD_OVERRIDES, _method_config, apply_overrides, method_config, training_key
from .machine import busy_cores, oversubscription_advice
from .names import check_name
from .storage import open_storage

log = logging.getLogger("xml_plugin")


class TrialFailed(RuntimeError):
    """A unit of work that failed for a reason recorded in its trial (``fail_reason``), e.g. a NaN loss."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.fail_reason = reason


class ExperimentState:
    """One experiment's resolved state: ``cfg``, ``methods``, ``folder``, ``storage``; after :meth:`setup` also
    ``ctx`` (data set, labels, feature source, trunk, device), ``split`` and ``resolved`` (what ``auto`` became)."""

    def __init__(self, cfg: Dict[str, Any], name: str, progress: bool = True,
                 overrides: Sequence[Tuple[str, Any]] = ()):
        """``cfg``: the merged config files; ``overrides``: the command line's ``(dotted path, value)`` pairs, applied
        over ``cfg`` and over every method's overlay (see :func:`configs.method_config`)."""
        self.base_cfg, self.overrides = cfg, list(overrides)
        cfg, _ = apply_overrides(cfg, self.overrides)
        self.cfg, self.name, self.progress = cfg, name, progress
        C.check_keys(cfg)
        check_numbers(cfg)
        g = cfg["general"]
        self.folder = Path(g["experiment_folder"]) / check_name(name)
        self.study_prefix = name  # the studies' names start with it (a copied or renamed folder keeps its studies')
        self.storage_url = g.get("storage") or f"sqlite:///{(self.folder / 'optuna.db').resolve()}"
        self.methods: List[str] = [registry.canonical_name("method", m) for m in g["methods"]]
        for m in (cfg.get(METHOD_OVERRIDES) or {}):  # a data-set preset may set values for methods not compared
            try:
                registry.get("method", m)
            except registry.UnknownComponentError as exc:
                raise C.ConfigError(f"{METHOD_OVERRIDES}.{m}: {exc}") from None
        unused = set(path for path, _ in self.overrides)
        for m in self.methods:  # every method's config must be valid before anything runs
            mcfg = self.method_config(m)
            unused &= set(_method_config(self.base_cfg, m, self.overrides)[1])
            C.check_keys(mcfg)
            self._validate(mcfg, m)
        if unused:
            raise C.ConfigError(f"--{sorted(unused)[0]} applies to none of the compared methods {self.methods}: its "
                                f"section is null for all of them (compare a method that sets it, e.g. --methods "
                                f"baseline xml, or give the whole section with a name)")
        self.ctx: Optional[T.RunContext] = None
        self.pool = None  # workers.FoldPool while Experiment.run trains
        self.bar = None  # the whole experiment's progress bar while it runs
        self._storage = None

    # ---------------------------------------------------------------- configs
    @property
    def search_mode(self) -> str:
        """``none`` (every method runs once), ``shared`` (every method searches with the same budget) or ``own``
        (``search.mode: all``: each method searches what it marks, budgets may differ)."""
        mode = (self.cfg.get("search") or {}).get("mode", "auto")
        if mode == "all":
            return "own"
        shared = C.search_space({k: v for k, v in self.cfg.items() if k != METHOD_OVERRIDES})
        return "shared" if mode == "auto" and shared else "none"

    def method_config(self, method: str) -> Dict[str, Any]:
        """The method's config; its search markers resolved to their defaults when nothing is searched."""
        mcfg = method_config(self.base_cfg, method, self.overrides)
        return C.resolve(mcfg) if self.search_mode == "none" else mcfg

    @property
    def reference(self) -> str:
        """The method the others are compared with (``general.reference``, default the first method)."""
        ref = self.cfg["general"].get("reference")
        return registry.canonical_name("method", ref) if ref else self.methods[0]

    @property
    def recall_ks(self) -> Optional[List[int]]:
        """Recall@K's K values (``eval.recall_at``), or None."""
        ks = (self.cfg.get("eval") or {}).get("recall_at")
        return [int(k) for k in ks] if ks else None

    @property
    def searches(self) -> int:
        """``general.searches``: how many times each method's whole search runs (different sampler seeds)."""
        return int(self.cfg["general"].get("searches") or 1)

    @property
    def attribution(self) -> bool:
        """``general.attribution``: reproduce the reference at every other method's best shared parameters."""
        value = self.cfg["general"].get("attribution")
        return True if value is None else bool(value)

    def n_trials(self, method: str) -> int:
        """The method's budget: ``general.n_trials`` when it searches something, else 1 (one run at its defaults)."""
        return int(self.cfg["general"]["n_trials"]) if C.search_space(self.method_config(method)) else 1

    def _validate(self, mcfg: Dict[str, Any], method: str) -> None:
        C.search_space(mcfg)  # marker errors
        for kind in ("dataset", "trunk", "embedder", "pooling", "loss", "optimizer", "sampler", "miner",
                     "loss_wrapper", "lr_scheduler"):
            spec = mcfg.get(kind)
            if spec and not C.is_search_marker(spec):
                name = registry.split_spec(spec)[0]
                if isinstance(name, str):
                    registry.get(kind, name)
        check_components(C.resolve(mcfg), method)
        if mcfg.get("loss_wrapper"):
            wrapper = registry.get("loss_wrapper", registry.split_spec(mcfg["loss_wrapper"])[0])
            pooling = registry.get("pooling", registry.split_spec(mcfg["pooling"])[0])
            if getattr(wrapper, "needs_histograms", False) and not getattr(pooling, "gives_histogram", False):
                raise C.ConfigError(f"method {method!r}: loss wrapper {registry.split_spec(mcfg['loss_wrapper'])[0]!r} needs "
                                    f"histograms but pooling {registry.split_spec(mcfg['pooling'])[0]!r} gives none "
                                    f"(use pooling xml or gsp)")

    # ---------------------------------------------------------------- storage, data, cache
    @property
    def storage(self):
        if self._storage is None:
            g = self.cfg["general"]
            self._storage = open_storage(self.storage_url, int(g.get("heartbeat_seconds", 5)))
        return self._storage

    def _claim_folder(self, dataset, split) -> None:
        """Called by :meth:`setup` (on the main process) before anything is written: the layer above claims the
        folder (``identity.claim_folder``); the state alone claims nothing."""

    def setup(self) -> T.RunContext:
        """Data set, class-disjoint splits, trunk and (on CPU by default) the frozen-trunk feature cache."""
        if self.ctx is not None:
            return self.ctx
        from ..data import embedded, eval_transform, get_dataset, protocol_splits, train_transform

        embedded.set_progress(self.progress)
        cfg = self.cfg
        if D.init_from_env() > 1 and not D.is_main():  # torchrun: rank 0 claims the folder and builds the cache first
            D.barrier()
        device = T.select_device(cfg["general"].get("device", "auto"))
        threads = cfg["general"].get("num_threads")
        if threads:  # torch and faiss (OpenMP) alike: several workers on one machine must not oversubscribe it
            import faiss
            torch.set_num_threads(int(threads))
            faiss.omp_set_num_threads(int(threads))
        elif device.type == "cpu":
            advice = oversubscription_advice(torch.get_num_threads(), busy_cores(), os.cpu_count() or 1)
            if advice:
                print(advice, file=sys.stderr)
        ds_cfg = cfg["dataset"]
        ds_options = {**(ds_cfg.get("options_for") or {}).get(ds_cfg["name"], {}), **(ds_cfg.get("options") or {})}
        try:
            dataset = get_dataset(ds_cfg["name"], root=ds_cfg.get("root"), **ds_options)
        except ValueError as exc:  # a data set's constructor refuses an option's value before it builds anything
            raise C.ConfigError(f"data set {ds_cfg['name']!r}: {exc} (dataset.options or "
                                f"dataset.options_for.{ds_cfg['name']}; docs/data.md)") from None
        labels = np.asarray(dataset.labels, dtype=np.int64)
        split = protocol_splits(dataset, test_fraction=ds_cfg.get("test_fraction", 0.5),
                                num_folds=ds_cfg.get("num_folds", 4), scheme=ds_cfg.get("split"))
        self.split = split
        trunk = build_trunk(cfg)
        k = frozen_blocks(cfg, trunk, device)
        tf_cfg = cfg.get("transforms", {})
        size = int(tf_cfg.get("image_size", 224))
        train_opts = {key: v for key, v in (tf_cfg.get("train") or {}).items() if v is not None}  # null pad: the old key
        eval_opts = dict(tf_cfg.get("eval") or {})
        try:
            train_tf = train_transform(size, trunk.mean, trunk.std, **train_opts)
            eval_tf = eval_transform(size, trunk.mean, trunk.std, **eval_opts)
        except ValueError as exc:  # the messages name the transforms.* key at fault
            raise C.ConfigError(f"{exc} (see docs/data.md, 'Transforms')") from None
        eval_opts = {key: v for key, v in eval_opts.items() if v is not None}  # unset options: same cache key as before
        cache_cfg = cfg.get("cache", {})
        cached = k > 0 and cache_cfg.get("enabled", True)
        self.resolved = {"device_type": device.type, "frozen_blocks": k, "image_size": size,
                         "cache_views": int(cache_cfg.get("views", 5)) if cached else 0}
        method_cfgs = [self.method_config(m) for m in self.methods]
        if cached and pooled_choice(method_cfgs, k, trunk.num_blocks, cache_cfg.get("pooled", "auto")):
            # pooled before the projection: equal to the full maps up to float rounding, but not the same numbers;
            # recorded only when true so that the folders of full-cache experiments keep their names
            self.resolved["cache_pooled"] = True
        elif cached and k == trunk.num_blocks and any(can_use_pooled(m) for m in method_cfgs):
            # GAP methods read the full cache's pooled copy (engine/cache.py): again equal up to float rounding only
            self.resolved["pooled_copy"] = True
        if self.cfg["general"].get("storage"):
            self.storage  # an unreachable server is reported before anything is written
        self._check_batches(labels, split, method_cfgs)
        if D.is_main():
            self._claim_folder(dataset, split)
        cache = None
        if k > 0 and cache_cfg.get("enabled", True):
            from ..data import cache_root
            folder = Path(cache_cfg.get("folder") or cache_root())
            views = int(cache_cfg.get("views", 5))
            info = {"dataset": dataset.fingerprint(), "trunk": trunk.name, "weights": trunk.weights_id, "frozen_blocks": k,
                    "image_size": size, "train_transform": train_opts, "eval_transform": eval_opts, "views": views, "seed": int(cache_cfg.get("seed", 0))}
            cache = FeatureCache.planned(folder, info, dataset, torch.nn.Sequential(*list(trunk.blocks)[:k]), train_tf,
                                         eval_tf, views, device, method_cfgs,
                                         trunk.num_blocks, cache_cfg, progress=self.progress)
        source = T.FeatureSource(dataset, cache, train_tf, eval_tf, int(cfg["trainer"].get("num_workers", 0)))
        self.ctx = T.RunContext(dataset, labels, source, trunk, k, device, self.progress)
        if D.is_main():
            D.barrier()
        return self.ctx

    def _check_batches(self, labels: np.ndarray, split, method_cfgs: List[Dict[str, Any]]) -> None:
        """Every method's sampler gives at least one batch on every fold's training classes (ConfigError naming the
        fold and the fix otherwise), before the folder is claimed."""
        seed = int(self.cfg["general"].get("seed", 0))
        for method, mcfg in zip(self.methods, method_cfgs):
            for f, (tr, _) in enumerate(split.folds):
                train_labels = np.unique(labels[np.asarray(tr)], return_inverse=True)[1]
                try:
                    T.make_batches(train_labels, C.resolve(mcfg), 1, seed)
                except (C.ConfigError, AssertionError, ValueError) as exc:  # PML's sampler asserts on its sizes
                    raise C.ConfigError(f"method {method!r}, fold {f} ({len(set(train_labels.tolist()))} training "
                                        f"classes): the sampler cannot make one batch of "
                                        f"{mcfg['trainer']['batch_size']} ({' '.join(str(exc).split())[:160]}); use "
                                        f"a smaller --trainer.batch_size or a data set with more classes") from None

    # ---------------------------------------------------------------- training units
    def run_dir(self, method: str, ccfg: Dict[str, Any], fold: int, seed: int) -> Path:
        """``runs/<method>/<hash>``: the hash covers the training config, the values ``auto`` resolved to, fold, seed.
        ``method`` is the folder's label: a method, or ``<reference>@<method>`` for an attribution's runs."""
        return self.folder / "runs" / method / stable_hash({"cfg": training_key(ccfg), "resolved": self.resolved,
                                                            "fold": fold, "seed": seed})

    def _train_folds(self, method: str, ccfg: Dict[str, Any], seed: int, descs: Sequence[str]) -> Dict[int, Dict[str, Any]]:
        """Every fold of one configuration and seed trained; ``{fold: result}``. On the worker processes when there
        are some (``general.workers``), in the main process otherwise."""
        pool = getattr(self, "pool", None)
        if pool is None:
            return {f: self._train(method, ccfg, f, seed, desc=d) for f, d in enumerate(descs)}

        def done(i, result):
            if getattr(self, "bar", None) is not None:
                self.bar.update(1)
        results = pool.run([(method, ccfg, f, seed, d) for f, d in enumerate(descs)], on_done=done)
        return dict(enumerate(results))

    def _train(self, method: str, ccfg: Dict[str, Any], fold: int, seed: int, desc: str,
               on_epoch=None) -> Dict[str, Any]:
        """One fold of one configuration and seed (read back when finished, resumed from its checkpoint)."""
        tr, va = self.split.folds[fold]
        D.lead([method, ccfg, fold, seed, desc])  # torchrun: the other ranks train this fold in lockstep
        try:
            return T.train_fold(ccfg, self.ctx, np.asarray(tr), np.asarray(va), self.run_dir(method, ccfg, fold, seed), seed,
                                desc=desc, on_epoch=on_epoch)
        except T.NonFiniteLossError as exc:
            raise TrialFailed(f"{slots.NONFINITE}: {exc}") from exc
        finally:
            if getattr(self, "bar", None) is not None:  # the whole experiment's ETA (see Experiment.run)
                self.bar.update(1)


__all__ = ["ExperimentState", "TrialFailed", "log"]
