"""The fair-comparison protocol (METHODS.md 4): per method an Optuna search over the config's marked keys with the
same budget, reproductions of the best configuration, then the report. Resumable and shareable between workers."""
from __future__ import annotations

import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import optuna
import torch

from .. import config as C
from .. import registry
from ..engine import train as T
from ..engine.cache import FeatureCache
from ..engine.evaluate import METRICS, split_metrics
from ..engine.io import atomic_write_json, read_json, stable_hash
from ..engine.model import build_trunk, frozen_blocks
from . import slots

log = logging.getLogger("xml_plugin")


class TrialFailed(RuntimeError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.fail_reason = reason


METHOD_OVERRIDES = "method_overrides"


def method_config(cfg: Dict[str, Any], method: str, protected: Sequence[str] = ()) -> Dict[str, Any]:
    """The base config, then the method's overlay (``config_methods/<method>.yaml`` or a registered dict), then
    ``method_overrides.<method>`` (the user's values for that method only).

    ``protected``: dotted paths the user set on the command line; an overlay that would silently replace one is an
    error that says how to set it for this method.
    """
    overlay = registry.get("method", method)
    if callable(overlay):
        overlay = overlay(copy.deepcopy(cfg))
    overlay = overlay or {}
    for path in protected:
        path = path.split("~")[0]
        for leaf in C.leaf_paths(overlay):
            if path == leaf or path.startswith(leaf + ".") or leaf.startswith(path + "."):
                raise C.ConfigError(
                    f"method {method!r} sets {leaf} itself, so --{path} would be ignored for it; set it for this method "
                    f"with --{METHOD_OVERRIDES}.{method}.{path} VALUE (or leave {method!r} out of --methods)")
    base = {k: v for k, v in cfg.items() if k != METHOD_OVERRIDES}
    return C.merge(C.merge(base, overlay), (cfg.get(METHOD_OVERRIDES) or {}).get(method) or {})


def training_key(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The part of a config that decides what a training run computes (not where results go, nor the budget)."""
    return {k: v for k, v in cfg.items() if k not in ("general", "search", "cache", "eval")} | {
        "cache_views": cfg.get("cache", {}).get("views")}


class Experiment:
    """One experiment folder: ``config.yaml``, ``splits.json``, ``optuna.db`` (default storage), ``runs/``, the report."""

    def __init__(self, cfg: Dict[str, Any], name: str, progress: bool = True, protected: Sequence[str] = ()):
        self.cfg, self.name, self.progress, self.protected = cfg, name, progress, tuple(protected)
        g = cfg["general"]
        self.folder = Path(g["experiment_folder"]) / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.storage_url = g.get("storage") or f"sqlite:///{(self.folder / 'optuna.db').resolve()}"
        self.methods: List[str] = [registry.canonical_name("method", m) for m in g["methods"]]
        unknown = set((cfg.get(METHOD_OVERRIDES) or {})) - set(self.methods)
        if unknown:
            raise C.ConfigError(f"{METHOD_OVERRIDES} names methods that are not compared: {sorted(unknown)} "
                                f"(methods: {self.methods})")
        for m in self.methods:  # every method's config must be valid before anything runs
            self._validate(self.method_config(m), m)
        self.ctx: Optional[T.RunContext] = None
        self._storage = None

    # ---------------------------------------------------------------- set-up
    def method_config(self, method: str) -> Dict[str, Any]:
        return method_config(self.cfg, method, self.protected)

    def _validate(self, mcfg: Dict[str, Any], method: str) -> None:
        C.search_space(mcfg)  # marker errors
        for kind, key in (("loss", "loss"), ("pooling", "pooling"), ("optimizer", "optimizer"), ("trunk", "trunk")):
            registry.get(kind, registry.split_spec(mcfg[key])[0])
        if mcfg.get("loss_wrapper"):
            wrapper = registry.get("loss_wrapper", registry.split_spec(mcfg["loss_wrapper"])[0])
            pooling = registry.get("pooling", registry.split_spec(mcfg["pooling"])[0])
            if getattr(wrapper, "needs_histograms", False) and not getattr(pooling, "gives_histogram", False):
                raise C.ConfigError(f"method {method!r}: loss wrapper {registry.split_spec(mcfg['loss_wrapper'])[0]!r} needs "
                                    f"histograms but pooling {registry.split_spec(mcfg['pooling'])[0]!r} gives none "
                                    f"(use pooling xml or gsp)")
        if mcfg.get("miner"):
            registry.get("miner", registry.split_spec(mcfg["miner"])[0])

    @property
    def storage(self):
        if self._storage is None:
            g = self.cfg["general"]
            self._storage = slots.make_storage(self.storage_url, int(g.get("heartbeat_seconds", 5)))
        return self._storage

    def setup(self) -> T.RunContext:
        """Data set, class-disjoint splits, trunk and (on CPU by default) the frozen-trunk feature cache."""
        if self.ctx is not None:
            return self.ctx
        from ..data import eval_transform, get_dataset, protocol_splits, train_transform

        cfg = self.cfg
        C.dump(cfg, self.folder / "config.yaml")
        device = T.select_device(cfg["general"].get("device", "auto"))
        threads = cfg["general"].get("num_threads")
        if threads:  # torch and faiss (OpenMP) alike: several workers on one machine must not oversubscribe it
            import faiss
            torch.set_num_threads(int(threads))
            faiss.omp_set_num_threads(int(threads))
        ds_cfg = cfg["dataset"]
        ds_options = {**(ds_cfg.get("options_for") or {}).get(ds_cfg["name"], {}), **(ds_cfg.get("options") or {})}
        dataset = get_dataset(ds_cfg["name"], root=ds_cfg.get("root"), **ds_options)
        labels = np.asarray(dataset.labels, dtype=np.int64)
        split_path = self.folder / "splits.json"
        split = protocol_splits(dataset, test_fraction=ds_cfg.get("test_fraction", 0.5), num_folds=ds_cfg.get("num_folds", 4))
        if split_path.is_file():
            saved = read_json(split_path)
            if saved != split.to_dict():
                raise C.ConfigError(f"{split_path} holds other splits than this config makes (another data set or options?); "
                                    f"use a new --experiment_name or delete the folder {self.folder}")
        else:
            split.save(split_path)
        self.split = split
        trunk = build_trunk(cfg)
        k = frozen_blocks(cfg, trunk, device)
        tf_cfg = cfg.get("transforms", {})
        size = int(tf_cfg.get("image_size", 224))
        train_opts = dict(tf_cfg.get("train") or {})
        train_tf = train_transform(size, trunk.mean, trunk.std, **train_opts)
        eval_tf = eval_transform(size, trunk.mean, trunk.std)
        cache_cfg = cfg.get("cache", {})
        cache = None
        if k > 0 and cache_cfg.get("enabled", True):
            from ..data import cache_root
            folder = Path(cache_cfg.get("folder") or cache_root())
            views = int(cache_cfg.get("views", 5))
            info = {"dataset": dataset.fingerprint(), "trunk": trunk.name, "weights": trunk.weights_id, "frozen_blocks": k,
                    "image_size": size, "train_transform": train_opts, "views": views, "seed": int(cache_cfg.get("seed", 0))}
            cache = FeatureCache(folder, info).build(dataset, torch.nn.Sequential(*list(trunk.blocks)[:k]), train_tf, eval_tf,
                                                     views, device, batch_size=int(cache_cfg.get("batch_size", 32)),
                                                     seed=int(cache_cfg.get("seed", 0)), progress=self.progress)
        source = T.FeatureSource(dataset, cache, train_tf, eval_tf, int(cfg["trainer"].get("num_workers", 0)))
        self.ctx = T.RunContext(dataset, labels, source, trunk, k, device, self.progress)
        atomic_write_json(self.folder / "experiment.json", {
            "name": self.name, "dataset": ds_cfg["name"], "loss": registry.split_spec(cfg["loss"])[0],
            "methods": self.methods, "storage": self.storage_url if not self.cfg["general"].get("storage") else "(given)"})
        return self.ctx

    # ---------------------------------------------------------------- training units
    def run_dir(self, method: str, ccfg: Dict[str, Any], fold: int, seed: int) -> Path:
        return self.folder / "runs" / method / stable_hash({"cfg": training_key(ccfg), "fold": fold, "seed": seed})

    def _train(self, method: str, ccfg: Dict[str, Any], fold: int, seed: int, desc: str, on_epoch=None) -> Dict[str, Any]:
        tr, va = self.split.folds[fold]
        try:
            return T.train_fold(ccfg, self.ctx, np.asarray(tr), np.asarray(va), self.run_dir(method, ccfg, fold, seed), seed,
                                desc=desc, on_epoch=on_epoch)
        except T.NonFiniteLossError as exc:
            raise TrialFailed(f"{slots.NONFINITE}: {exc}") from exc

    def study(self, method: str, part: str) -> optuna.Study:
        g = self.cfg["general"]
        search = self.cfg.get("search", {})
        pruner = optuna.pruners.MedianPruner(n_startup_trials=int(search.get("pruner_startup_trials", 3))) \
            if g.get("pruner", "none") == "median" else optuna.pruners.NopPruner()
        return optuna.create_study(study_name=f"{self.name}.{method}.{part}", storage=self.storage, direction="maximize",
                                   sampler=self.sampler(0), pruner=pruner, load_if_exists=True)

    def sampler(self, slot: int) -> optuna.samplers.BaseSampler:
        """TPE, seeded by the search seed and the slot."""
        search = self.cfg.get("search", {})
        seed = int(search.get("seed", self.cfg["general"].get("seed", 0))) + 7919 * slot
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(search.get("n_startup_trials", 5)))

    def n_trials(self, method: str) -> int:
        return int(self.cfg["general"]["n_trials"]) if C.search_space(self.method_config(method)) else 1

    def search(self, method: str) -> Dict[str, Any]:
        """Step 1: the Optuna study; returns the best trial's parameters (empty for a method with nothing to search)."""
        self.setup()
        mcfg = self.method_config(method)
        space = C.search_space(mcfg)
        study = self.study(method, "search")
        seed = int(self.cfg["general"].get("seed", 0))
        n = self.n_trials(method)

        def work(trial: optuna.Trial, slot: int) -> float:
            # seeded per slot: a resumed search proposes what an uninterrupted one would have
            study.sampler = self.sampler(slot)
            params = {path: C.suggest(trial, path, marker) for path, marker in space.items()}
            ccfg = C.resolve(mcfg, params)
            values = []
            for f in range(len(self.split.folds)):
                res = self._train(method, ccfg, f, seed, desc=f"{method} trial {slot + 1}/{n} fold {f + 1}")
                v = res["val"][T.OBJECTIVE]
                values.append(v)
                trial.set_user_attr(f"fold{f}", res["val"])
                trial.report(float(np.mean(values)), f)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return float(np.mean(values))

        slots.run_slots(study, n, work, on_wait=lambda: log.info("%s: waiting for other workers' trials", method))
        done = [t for t in slots.finished_trials(study) if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            raise RuntimeError(f"method {method!r}: no search trial finished (all failed or pruned); see {self.storage_url}")
        best = max(done, key=lambda t: t.value)
        return dict(best.params)

    def reproduce(self, method: str, params: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Step 2: the best configuration trained again with new seeds and tested (separate and concatenated)."""
        self.setup()
        ccfg = C.resolve(self.method_config(method), params)
        study = self.study(method, "reproductions")
        n = int(self.cfg["general"]["reproductions"])
        base = int(self.cfg["general"].get("seed", 0))
        test = np.asarray(self.split.test)
        test_labels = torch.as_tensor(self.ctx.labels[test])
        ds = self.ctx.dataset
        is_q = ds.is_query[test] if getattr(ds, "is_query", None) is not None else None
        is_g = ds.is_gallery[test] if getattr(ds, "is_gallery", None) is not None else None
        eval_bs = int(self.cfg.get("eval", {}).get("batch_size", 128))

        def work(trial: optuna.Trial, slot: int) -> float:
            seed = base + 1000 * (slot + 1)
            trial.set_user_attr("seed", seed)
            trial.set_user_attr("params", params)
            embs, per_fold = [], []
            for f in range(len(self.split.folds)):
                self._train(method, ccfg, f, seed, desc=f"{method} reproduction {slot + 1}/{n} fold {f + 1}")
                model = T.load_best(ccfg, self.ctx, self.run_dir(method, ccfg, f, seed))
                e = T.embed(model, self.ctx, test, eval_bs)
                embs.append(torch.nn.functional.normalize(e, dim=1))
                per_fold.append(split_metrics(e, test_labels, is_q, is_g))
            separate = {m: float(np.mean([r[m] for r in per_fold])) for m in METRICS}
            cat = torch.cat(embs, dim=1)  # [N, folds * d]
            concatenated = split_metrics(cat, test_labels, is_q, is_g)
            if slot == 0:
                np.save(self.folder / f"test_embeddings_{method}.npy", cat.numpy())
            trial.set_user_attr("separate", separate)
            trial.set_user_attr("concatenated", concatenated)
            trial.set_user_attr("folds", per_fold)
            return concatenated[T.OBJECTIVE]

        slots.run_slots(study, n, work)
        finished = slots.finished_trials(study)
        failed = [t for t in finished if t.state != optuna.trial.TrialState.COMPLETE]
        for t in failed:  # a NaN/inf reproduction keeps its slot (it was a real attempt) but has no test metrics
            print(f"warning: {method} reproduction {t.user_attrs.get(slots.SLOT)} failed: "
                  f"{t.user_attrs.get(slots.REASON)}", file=sys.stderr)
        done = [t.user_attrs for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            raise RuntimeError(f"method {method!r}: every reproduction failed; see {self.storage_url}")
        return done

    # ---------------------------------------------------------------- all of it
    def run(self) -> str:
        self.setup()
        t0 = time.perf_counter()
        results: Dict[str, List[Dict[str, Any]]] = {}
        best_params: Dict[str, Dict[str, Any]] = {}
        for method in self.methods:
            best_params[method] = self.search(method)
            results[method] = self.reproduce(method, best_params[method])
        md = self.write_report(results, best_params)
        print(f"wall time of this invocation: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return md

    def write_report(self, results, best_params) -> str:
        from . import plots, report

        dataset = self.cfg["dataset"]["name"]
        records = []
        for method, reps in results.items():
            for rep in reps:
                for emb in report.EMBEDDINGS:
                    for metric in METRICS:
                        records.append({"dataset": dataset, "method": method, "embedding": emb, "metric": metric,
                                        "value": rep[emb][metric]})
        rows = report.summarize(records)
        loss = registry.split_spec(self.cfg["loss"])[0]
        lines = [f"Loss: `{loss}`; data set: `{dataset}`; {len(self.split.folds)} folds; "
                 f"search budget: {self.cfg['general']['n_trials']} trials per searched method; "
                 f"reproductions: {self.cfg['general']['reproductions']}. Values in %, mean ± 95% CI half-width.", ""]
        for method in self.methods:
            p = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in best_params[method].items())
            lines.append(f"- best parameters of `{method}`: {p or '(nothing searched)'}")
        md = report.write_report(self.folder, rows, f"{self.name}: {loss} on {dataset}", notes="\n".join(lines))
        self._plots(plots, rows)
        return md

    def _plots(self, plots, rows) -> None:
        trials = []
        for method in self.methods:
            for t in self.study(method, "search").get_trials(deepcopy=False):
                if t.user_attrs.get(slots.REASON) == slots.SURPLUS:
                    continue
                trials.append({"number": t.number, "value": t.value if t.state.name == "COMPLETE" else
                               (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None),
                               "state": t.state.name, "method": method, "params": dict(t.params)})
        try:
            plots.plot_history(trials, self.folder / "optimization_history.png")
            names = sorted({p for t in trials for p in t["params"]})
            for p in names:
                plots.plot_param(trials, p, self.folder / f"objective_vs_{p.split('.')[-1]}.png")
            plots.plot_metrics(rows, self.folder / "final_metrics.png")
            self._retrieval_plot(plots)
        except Exception as exc:  # a plot must never cost the results
            print(f"warning: a plot failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    def _retrieval_plot(self, plots, n_queries: int = 6, k: int = 5) -> None:
        ds, test = self.ctx.dataset, np.asarray(self.split.test)
        labels = self.ctx.labels[test]
        rng = np.random.default_rng(0)
        queries = rng.choice(len(test), size=min(n_queries, len(test)), replace=False)
        for method in self.methods:
            path = self.folder / f"test_embeddings_{method}.npy"
            if not path.is_file():
                continue
            e = torch.nn.functional.normalize(torch.from_numpy(np.load(path)), dim=1)
            sims = e[queries] @ e.T  # [q, N]
            sims[torch.arange(len(queries)), torch.as_tensor(queries)] = -float("inf")
            nn_idx = sims.topk(k, dim=1).indices.numpy()
            plots.plot_retrieval([ds.image(int(test[q])) for q in queries], [int(labels[q]) for q in queries],
                                 [[ds.image(int(test[j])) for j in row] for row in nn_idx],
                                 [[int(labels[j]) for j in row] for row in nn_idx],
                                 self.folder / f"retrieval_{method}.png", k=k)
