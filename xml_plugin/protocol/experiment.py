"""The fair-comparison protocol (docs/methods.md, the protocol; docs/protocol.md): per method and search an Optuna
search over the config's marked keys with the same budget, reproductions of the best configuration, the reference
reproduced at every other method's parameters (attribution), paired verdicts, the report. Resumable and shareable
between workers.

A thin layer that wires the pieces of ``protocol/`` (imports run one way, tests/test_protocol.py, "layout"):
``state`` (configs, storage, split, run folders, the fold-training call) at the bottom; ``identity`` (fingerprint,
folder claim, restart, studies), ``search`` and ``reproductions`` taking that state; ``verdicts`` (pure statistics),
``report``, ``measures`` and ``plots`` on plain data; ``workers`` (the fold pool) and ``slots`` (exact budgets).
The names other code imports from here (``method_config``, ``busy_cores``, ...) are re-exported."""
from __future__ import annotations

import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import optuna
import torch

from .. import config as C
from .. import registry
from ..engine import distributed as D
from ..engine.evaluate import query_gallery
from . import identity, reproductions as R, search as S, verdicts
from .checks import (CONSUMED_OPTIONS, MAX_REPRODUCTIONS, MAX_SEARCHES, MAX_SEED, MAX_TRIALS,  # noqa: F401
                     TRUSTED_MODULES, _is_device, _kind_of_default, check_components, check_numbers,
                     check_option_types, dry_run_loss)
from .configs import COMPONENT_SECTIONS, METHOD_OVERRIDES, _method_config, apply_overrides, method_config  # noqa: F401
from .configs import training_key  # noqa: F401
from .identity import NOT_RESULTS, fingerprint_diff, result_view  # noqa: F401
from .identity import folder_lock as _folder_lock, rename_studies as _rename_studies  # noqa: F401
from .identity import without_nulls as _without_nulls  # noqa: F401
from .log import experiment_bar
from .machine import busy_cores, oversubscription_advice  # noqa: F401
from .names import attribution_label
from .reproductions import Reproduced
from .search import marker_range as _marker_range  # noqa: F401
from .state import ExperimentState, TrialFailed, log  # noqa: F401
from .storage import _NoInterruptTraceback, damaged_storage, open_storage, quiet_interrupts  # noqa: F401
from .storage import db_errors as _db_errors  # noqa: F401
from .workers import FoldPool, resolve_workers


class Experiment(ExperimentState):
    """One experiment folder: ``config.yaml``, ``splits.json``, ``optuna.db`` (default storage), ``runs/``,
    ``embeddings/``, the report."""

    # ---------------------------------------------------------------- identity
    def fingerprint(self, dataset) -> Dict[str, Any]:
        return identity.fingerprint(self, dataset)

    def _method_fingerprint(self, method: str) -> str:
        return identity.method_fingerprint(self, method)

    def _claim_folder(self, dataset, split) -> None:
        identity.claim_folder(self, dataset, split)

    def _write_identity(self, folder, fp: Dict[str, Any], split, write_splits: bool) -> None:
        identity.write_identity(self, folder, fp, split, write_splits)

    def restart(self):
        return identity.restart(self)

    def study(self, method: str, part: str, search: int = 0) -> optuna.Study:
        """Search ``search``'s study of ``method`` (``part`` ``search`` or ``reproductions``)."""
        if part == "search":
            return S.study(self, method, search)
        return R.study(self, method, method, search)

    # ---------------------------------------------------------------- search, reproductions
    def sampler(self, slot: int, search: int = 0) -> optuna.samplers.BaseSampler:
        return S.sampler(self, slot, search)

    def search(self, method: str, search: int = 0) -> Dict[str, Any]:
        """Step 1: search ``search`` of ``method``; the best trial's parameters (empty with nothing to search)."""
        return S.run_search(self, method, search)

    def search_summary(self, method: str, search: int = 0) -> Dict[str, Any]:
        return S.summary(self, method, search)

    def reproduce(self, method: str, params: Dict[str, Any], search: int = 0, label: Optional[str] = None
                  ) -> Reproduced:
        """Step 2: ``method`` at ``params`` trained again with the reproduction seeds and tested."""
        return R.reproduce(self, method, params, search, label)

    def attribute(self, method: str, best: Dict[str, Dict[str, Any]], reference_rep: Reproduced,
                  search: int = 0) -> Reproduced:
        """Step 3: the reference reproduced at ``method``'s best values of the keys they share (its own best values
        for the rest), under the label ``<reference>@<method>``. When those are the reference's own best values the
        runs would be the reference's own (same config and seeds): its reproductions are used as they are."""
        ref = self.reference
        params = R.attribution_params(best[method], best[ref], C.search_space(self.method_config(ref)))
        label = attribution_label(ref, method)
        if params == best[ref]:
            if self.bar is not None:
                self.bar.update(int(self.cfg["general"]["reproductions"]) * len(self.split.folds))
            return Reproduced(label, ref, search, reference_rep.ccfg, params, reference_rep.trials)
        return self.reproduce(ref, params, search, label=label)

    # ---------------------------------------------------------------- all of it
    def run(self) -> str:
        quiet_interrupts()
        self.setup()
        if not D.is_main():  # torchrun: rank 0 runs the Optuna bookkeeping and the report, this rank follows it
            D.follow(self._train, expected=(TrialFailed,))
            return ""
        t0 = time.perf_counter()
        folds, reps = len(self.split.folds), int(self.cfg["general"]["reproductions"])
        ref = self.reference
        others = [m for m in self.methods if m != ref] if self.attribution else []
        workers = resolve_workers(self.cfg["general"].get("workers", "auto"), self.ctx.device.type, D.world_size())
        self.pool = FoldPool(self, workers, int(self.cfg["general"].get("num_threads") or 1)) if workers > 1 else None
        per_search = sum((self.n_trials(m) + reps) * folds for m in self.methods) + len(others) * reps * folds
        self.bar = experiment_bar(self.searches * per_search, enabled=self.progress)
        reproduced: List[Reproduced] = []
        attribution: Dict[Tuple[str, int], Reproduced] = {}
        interrupted = True
        try:
            for s in range(self.searches):
                best: Dict[str, Dict[str, Any]] = {}
                own: Dict[str, Reproduced] = {}
                for method in self.methods:
                    best[method] = self.search(method, s)
                    own[method] = self.reproduce(method, best[method], s)
                    reproduced.append(own[method])
                for method in others:
                    attribution[(method, s)] = self.attribute(method, best, own[ref], s)
            interrupted = False
        finally:
            self.bar.close()
            self.bar = None
            if self.pool is not None:
                self.pool.close(kill=interrupted)  # on Ctrl-C or an error: at once, the folds resume from checkpoints
                self.pool = None
        D.lead(None)  # torchrun: the other ranks are done
        md = self.write_report(reproduced, attribution)
        print(f"wall time of this invocation: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return md

    # ---------------------------------------------------------------- the report's plain data
    def _bootstrap(self, reproduced: Sequence[Reproduced], primary: Dict[str, str], dataset: str) -> List[dict]:
        """``verdicts.bootstrap_rows`` of the primary endpoint per search, from every reproduction's test embedding;
        [] when ``report.bootstrap_resamples`` is 0 or the metric is not one the bootstrap recomputes."""
        n = int((self.cfg.get("report") or {}).get("bootstrap_resamples") or 0)
        if n <= 0 or primary["metric"] not in verdicts.BOOTSTRAP_METRICS:
            return []
        test = np.asarray(self.split.test)
        labels = self.ctx.labels[test]
        is_q, is_g = query_gallery(self.ctx.dataset, test)
        folds, out = len(self.split.folds), []
        for s in sorted({r.search for r in reproduced}):
            embs: Dict[str, Dict[int, Any]] = {}
            for rep in (r for r in reproduced if r.search == s):
                by_seed = {t["seed"]: R.test_embeddings(self, rep, t["seed"]) for t in rep.trials}
                missing = [seed for seed, e in by_seed.items() if e is None]
                if missing:
                    print(f"warning: no test embeddings of {rep.label} seeds {missing} here (trained by another "
                          f"machine?): no test-class bootstrap for it", file=sys.stderr)
                    continue
                embs[rep.label] = {seed: e if primary["embedding"] == "concatenated" else np.split(e, folds, axis=1)
                                   for seed, e in by_seed.items()}  # [N, folds d], or folds x [N, d]
            if self.reference not in embs:
                continue
            rows = verdicts.bootstrap_rows(embs, labels, self.reference, dataset, primary=primary, n=n,
                                           seed=int(self.cfg["general"].get("seed", 0)), is_query=is_q, is_gallery=is_g)
            out += [dict(r, search=s) if self.searches > 1 else r for r in rows]
        return out

    def _space(self, reproduced: Sequence[Reproduced], dataset: str) -> List[dict]:
        """The embedding-space measures of every reproduction's test embedding, as records."""
        from .measures import space_records
        labels = self.ctx.labels[np.asarray(self.split.test)]
        by_method: Dict[str, List[dict]] = {}
        for rep in reproduced:
            for t in rep.trials:
                values = R.space_measures(self, rep, t["seed"], labels)
                if values is not None:
                    by_method.setdefault(rep.label, []).append(
                        {"seed": t["seed"], "reproduction": t.get("slot"), "measures": values,
                         "search": rep.search if self.searches > 1 else None})
        return space_records(by_method, dataset)

    def write_report(self, reproduced: Sequence[Reproduced],
                     attribution: Optional[Dict[Tuple[str, int], Reproduced]] = None) -> str:
        from . import measures, plots, report

        attribution = attribution or {}
        dataset = self.cfg["dataset"]["name"]
        several, ref = self.searches > 1, self.reference
        primary = verdicts.parse_primary((self.cfg.get("report") or {}).get("primary"))
        records, per_fold = [], []
        for rep in reproduced:
            recs, folds = R.records(rep, dataset, with_search=several)
            records += recs
            per_fold += folds
        rows = report.summarize(records)
        diffs = report.paired_differences(records, ref, primary=primary)
        over = verdicts.over_searches_rows(diffs, primary=primary)
        attributed, attr_records = [], []
        for (method, s), rep in attribution.items():
            mine = [r for r in records if r["method"] == method and r.get("search", s) == s]
            at_params, _ = R.records(rep, dataset, with_search=several, method=ref)
            attributed += report.paired_differences(mine + at_params, ref, primary=primary,
                                                    comparison=verdicts.EQUAL_PARAMS)
            recs, folds = R.records(rep, dataset, with_search=several)  # labelled <reference>@<method>
            attr_records += folds + recs
        boot = self._bootstrap(reproduced, primary, dataset)
        space = self._space(reproduced, dataset)
        space_rows = report.summarize(space)
        health = {}
        for rep in reproduced:
            for t in rep.trials:
                health.setdefault(rep.label, []).extend(R.fold_health(self, rep, t["seed"]))
        loss = registry.split_spec(self.cfg["loss"])[0]
        summaries = {(m, s): self.search_summary(m, s) for s in range(self.searches) for m in self.methods}
        mode = {"shared": "every method searched the same shared keys plus its own",
                "none": "nothing searched: every method ran once at its defaults",
                "own": "search.mode all: each method searched its own keys"}[self.search_mode]
        searches = (f"{self.searches} searches per method (different sampler seeds)" if several
                    else "one search per method")
        attr = (f"attribution: `{ref}` reproduced at each other method's best shared values" if attribution
                else "attribution: off")
        lines = [f"Loss: `{loss}`; data set: `{dataset}`; {len(self.split.folds)} folds; search: {mode}; "
                 f"budget: {self.cfg['general']['n_trials']} trials per searching method; {searches}; "
                 f"reproductions: {self.cfg['general']['reproductions']}; reference: `{ref}`; {attr}.", "",
                 *S.summary_table(summaries)]
        extra = [t for t in (measures.space_table(space_rows), measures.health_table(measures.health_summary(health)))
                 if t]
        notes = "\n".join(lines) + "".join("\n\n" + t for t in extra)
        md = report.write_report(self.folder, rows, f"{self.name}: {loss} on {dataset}", notes=notes, diffs=diffs,
                                 preface=S.unequal_budgets(summaries),
                                 reproductions=per_fold + records + attr_records + space, primary=primary,
                                 attribution=attributed, bootstrap=boot, over_searches=over, measures=space_rows)
        self._plots(plots, rows)
        return md

    def _plots(self, plots, rows) -> None:
        trials = [t for s in range(self.searches) for m in self.methods for t in S.plotted_trials(self, m, s)]
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
            e = torch.nn.functional.normalize(torch.from_numpy(np.load(path, allow_pickle=False)), dim=1)
            sims = e[queries] @ e.T  # [q, N]
            sims[torch.arange(len(queries)), torch.as_tensor(queries)] = -float("inf")
            nn_idx = sims.topk(k, dim=1).indices.numpy()
            plots.plot_retrieval([ds.image(int(test[q])) for q in queries], [int(labels[q]) for q in queries],
                                 [[ds.image(int(test[j])) for j in row] for row in nn_idx],
                                 [[int(labels[j]) for j in row] for row in nn_idx],
                                 self.folder / f"retrieval_{method}.png", k=k)


__all__ = ["Experiment", "ExperimentState", "TrialFailed", "method_config", "apply_overrides", "training_key",
           "open_storage", "result_view", "fingerprint_diff", "busy_cores", "oversubscription_advice",
           "check_components", "check_numbers", "quiet_interrupts", "damaged_storage"]
