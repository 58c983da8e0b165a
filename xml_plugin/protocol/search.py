"""The search of one method (docs/protocol.md, "Search: the same budget for every method"): an Optuna study over the
config's search markers with the same budget for every method, exact across workers (``slots``). Search ``s`` of
``general.searches`` has its own study (``names.study_name(..., search=s)``) and its own sampler seeds; search 0 is
the one every experiment had before. Takes the state (``state.ExperimentState``)."""
from __future__ import annotations

import time
from typing import Any, Dict, List

import numpy as np
import optuna

from .. import config as C
from ..engine import train as T
from . import identity, slots
from .log import ExperimentLog
from .run_index import record_run
from .state import log

SLOT_STRIDE, SEARCH_STRIDE = 7919, 1_000_003  # primes: (slot, search) pairs within the budgets never share a seed


def sampler_seed(seed: int, slot: int, search: int = 0) -> int:
    """TPE's seed for ``slot`` of search ``search``: ``seed + 7919 slot + 1000003 search`` (mod 2^32); search 0 is
    ``seed + 7919 slot``, the seed of every experiment before several searches existed."""
    return (int(seed) + SLOT_STRIDE * int(slot) + SEARCH_STRIDE * int(search)) % 2 ** 32


def sampler(state, slot: int, search: int = 0) -> optuna.samplers.BaseSampler:
    """TPE, seeded by ``general.seed`` (the one seed, ``--seed``), the slot and the search (:func:`sampler_seed`)."""
    cfg = state.cfg.get("search", {})
    return optuna.samplers.TPESampler(seed=sampler_seed(state.cfg["general"].get("seed", 0), slot, search),
                                      n_startup_trials=int(cfg.get("n_startup_trials", 5)))


def label(method: str, search: int) -> str:
    """How logs and plots name search ``search`` of ``method``: the method alone for search 0."""
    return method if not search else f"{method} search {search}"


def study(state, method: str, search: int = 0) -> optuna.Study:
    return identity.study(state, method, "search", sampler(state, 0, search), search=search)


def run_search(state, method: str, search: int = 0) -> Dict[str, Any]:
    """Search ``search`` of ``method`` run to its budget (resumed, shared with other workers); the best complete
    trial's parameters (empty for a method with nothing to search). Every trial trains with ``general.seed``: the
    searches differ by their sampler's proposals only."""
    state.setup()
    mcfg = state.method_config(method)
    space = C.search_space(mcfg)
    st = study(state, method, search)
    seed = int(state.cfg["general"].get("seed", 0))
    n = state.n_trials(method)
    pruning = state.cfg["general"].get("pruner", "none") != "none"
    name = label(method, search)

    def work(trial: optuna.Trial, slot: int) -> float:
        # seeded per slot: a resumed search proposes what an uninterrupted one would have
        st.sampler = sampler(state, slot, search)
        params = {path: C.suggest(trial, path, marker) for path, marker in space.items()}
        ccfg = C.resolve(mcfg, params)
        values, t0 = [], time.perf_counter()
        folds = range(len(state.split.folds))
        for f in folds:
            record_run(state.folder, state.run_dir(method, ccfg, f, seed), method, "trial", slot, f, seed, params,
                       ccfg, state.resolved)
        descs = [f"{name} trial {slot + 1}/{n} fold {f + 1}" for f in folds]
        # in parallel unless a pruner must see the folds one by one
        done = state._train_folds(method, ccfg, seed, descs) if not pruning else {}
        for f in folds:
            res = done[f] if f in done else state._train(method, ccfg, f, seed, desc=descs[f])
            values.append(res["val"][T.OBJECTIVE])
            trial.set_user_attr(f"fold{f}", res["val"])
            trial.report(float(np.mean(values)), f)
            if trial.should_prune():
                ExperimentLog(state.folder).trial(name, slot, n, params, float(np.mean(values)),
                                                  time.perf_counter() - t0, state=f"pruned after fold {f + 1}")
                raise optuna.TrialPruned()
        ExperimentLog(state.folder).trial(name, slot, n, params, float(np.mean(values)), time.perf_counter() - t0)
        return float(np.mean(values))

    slots.run_slots(st, n, work, on_wait=lambda: log.info("%s: waiting for other workers' trials", name))
    done = [t for t in slots.finished_trials(st) if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise RuntimeError(f"method {method!r}: no trial of search {search} finished (all failed or pruned); "
                           f"see {state.storage_url}")
    return dict(max(done, key=lambda t: t.value).params)


def summary(state, method: str, search: int = 0) -> Dict[str, Any]:
    """Completed / pruned / failed trials of one search, its searched keys and ranges, its best trial."""
    finished = slots.finished_trials(study(state, method, search))
    done = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(done, key=lambda t: t.value) if done else None
    return {"completed": len(done), "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in finished),
            "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in finished),
            "space": C.search_space(state.method_config(method)),
            "best": dict(best.params) if best else {}, "best_value": best.value if best else None}


def plotted_trials(state, method: str, search: int = 0) -> List[Dict[str, Any]]:
    """The search's trials as plain dicts for ``plots`` (surplus bookkeeping trials left out)."""
    out = []
    for t in study(state, method, search).get_trials(deepcopy=False):
        if t.user_attrs.get(slots.REASON) == slots.SURPLUS:
            continue
        out.append({"number": t.number, "value": t.value if t.state.name == "COMPLETE" else
                    (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None),
                    "state": t.state.name, "method": label(method, search), "params": dict(t.params)})
    return out


# ----------------------------------------------------------------------------- the report's search table (plain data)

def marker_range(marker: Dict[str, Any]) -> str:
    if marker["search"] == "categorical":
        return "{" + ", ".join(map(str, marker["choices"])) + "}"
    return f"[{marker['low']:g}, {marker['high']:g}]" + (" log" if marker.get("log") else "")


def unequal_budgets(summaries: Dict[tuple, Dict[str, Any]]) -> str:
    """The bold line above the report when the searches did not all complete the same number of trials (keys of
    ``summaries``: ``(method, search)``), else ''."""
    completed = {k: s["completed"] for k, s in summaries.items()}
    if len(set(completed.values())) <= 1:
        return ""
    shown = ", ".join(f"{m}: {n}" if not s else f"{m} (search {s}): {n}" for (m, s), n in completed.items())
    return (f"**Unequal budgets: the methods did not get the same number of completed search trials ({shown}). "
            f"The comparison is not a fair one.**")


def summary_table(summaries: Dict[tuple, Dict[str, Any]]) -> List[str]:
    """Markdown lines: per method and search, the completed trials, searched keys (ranges), best values and the best
    validation MAP@R."""
    lines = ["| Method | completed trials | searched keys (range) | best values | best validation MAP@R |",
             "|---|---:|---|---|---:|"]
    for (method, s), sm in summaries.items():
        keys = "; ".join(f"`{k}` {marker_range(v)}" for k, v in sm["space"].items()) or "(none)"
        best = "; ".join(f"`{k}` = {v:.4g}" if isinstance(v, float) else f"`{k}` = {v}"
                         for k, v in sm["best"].items()) or "(defaults)"
        value = "–" if sm["best_value"] is None else f"{100 * sm['best_value']:.2f}"
        extra = "".join(f", {sm[k]} {k}" for k in ("pruned", "failed") if sm[k])
        lines.append(f"| {label(method, s)} | {sm['completed']}{extra} | {keys} | {best} | {value} |")
    return lines
