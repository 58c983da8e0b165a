"""Reproductions (docs/protocol.md, "Reproductions and test"): a configuration trained again with the reproduction
seeds ``general.seed + 1000 (r + 1)`` on every fold, each fold's best model embedding the test classes, the metrics of
the separate fold models and of their concatenation. The same for a method's best configuration (one study per
search) and for the attribution's reference at another method's parameters (``names.attribution_label``). Every
reproduction's test embedding is kept (``embeddings/``) for the bootstrap and the embedding-space measures. Takes the
state (``state.ExperimentState``)."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import optuna
import torch

from .. import config as C
from ..engine import train as T
from ..engine.evaluate import fold_ensemble_metrics, query_gallery
from ..engine.io import DamagedFileError, atomic_write_json, read_json
from . import identity, slots
from .log import ExperimentLog
from .run_index import record_run
from .search import label as search_label, sampler

EMBEDDINGS = "embeddings"  # <experiment>/embeddings/<label>[/search<s>]/<seed>.npy: [N_test, folds * d] float32


@dataclass
class Reproduced:
    """The finished reproductions of one configuration: ``label`` names its studies and run folders (a method, or
    ``<reference>@<method>``), ``method`` is the method whose config it trains, ``trials`` the complete trials' user
    attributes (``slot``, ``seed``, ``separate``, ``concatenated``, ``folds``, ``params``)."""
    label: str
    method: str
    search: int
    ccfg: Dict[str, Any]
    params: Dict[str, Any]
    trials: List[Dict[str, Any]] = field(default_factory=list)


def reproduction_seed(base: int, slot: int) -> int:
    """Reproduction ``slot``'s seed: ``general.seed + 1000 (slot + 1)``, the same for every method and search."""
    return int(base) + 1000 * (int(slot) + 1)


def attribution_params(best_method: Dict[str, Any], best_reference: Dict[str, Any],
                       reference_space: Dict[str, Any]) -> Dict[str, Any]:
    """The reference's parameters for "R at M's parameters": the reference's own best values, with every key both
    search replaced by the method's best value (keys only the method searches, e.g. XML's ``lam``, do not exist for
    the reference)."""
    return {**best_reference, **{k: v for k, v in best_method.items() if k in reference_space}}


def embeddings_path(folder: Path, label: str, search: int, seed: int) -> Path:
    sub = Path(EMBEDDINGS) / label / (f"search{search}" if search else "")
    return Path(folder) / sub / f"{int(seed)}.npy"


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` written under a temporary name and renamed into place (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)


def study(state, label: str, method: str, search: int = 0) -> optuna.Study:
    return identity.study(state, label, "reproductions", sampler(state, 0, search), search=search, owner=method,
                          role=None if label == method else
                          f"reproductions of {method!r} at the best shared parameters of another method (attribution)")


def _fold_models_embed(state, label: str, ccfg: Dict[str, Any], seed: int, test: np.ndarray, desc: str,
                       retrain: bool) -> List[torch.Tensor]:
    """Each fold's best model's test embedding [N, d]; a damaged ``best.pt`` is trained again when ``retrain``
    (deterministic: the same model)."""
    eval_bs = int(state.cfg.get("eval", {}).get("batch_size", 128))
    embs = []
    for f in range(len(state.split.folds)):
        run_dir = state.run_dir(label, ccfg, f, seed)
        try:
            model = T.load_best(ccfg, state.ctx, run_dir)
        except DamagedFileError as exc:
            if not retrain:
                raise
            T.discard_run(run_dir, exc.reason)
            state._train(label, ccfg, f, seed, desc=f"{desc} fold {f + 1}")
            model = T.load_best(ccfg, state.ctx, run_dir)
        embs.append(T.embed(model, state.ctx, test, eval_bs))
    return embs


def reproduce(state, method: str, params: Dict[str, Any], search: int = 0, label: Optional[str] = None) -> Reproduced:
    """``method``'s config at ``params`` trained with every reproduction seed and tested; resumed and shared with
    other workers (one study per label and search)."""
    state.setup()
    label = label or method
    ccfg = C.resolve(state.method_config(method), params)
    st = study(state, label, method, search)
    n = int(state.cfg["general"]["reproductions"])
    base = int(state.cfg["general"].get("seed", 0))
    test = np.asarray(state.split.test)
    test_labels = torch.as_tensor(state.ctx.labels[test])
    is_q, is_g = query_gallery(state.ctx.dataset, test)
    name = search_label(label, search)

    def work(trial: optuna.Trial, slot: int) -> float:
        seed = reproduction_seed(base, slot)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("params", params)
        t0 = time.perf_counter()
        folds = range(len(state.split.folds))
        for f in folds:
            record_run(state.folder, state.run_dir(label, ccfg, f, seed), label, "reproduction", slot, f, seed,
                       params, ccfg, state.resolved)
        desc = f"{name} reproduction {slot + 1}/{n}"
        state._train_folds(label, ccfg, seed, [f"{desc} fold {f + 1}" for f in folds])
        embs = _fold_models_embed(state, label, ccfg, seed, test, desc, retrain=True)
        per_fold, separate, concatenated, cat = fold_ensemble_metrics(embs, test_labels, is_q, is_g,
                                                                      recall_ks=state.recall_ks)
        _save_npy(embeddings_path(state.folder, label, search, seed), cat.numpy().astype(np.float32))
        if slot == 0 and search == 0 and label == method:  # the retrieval plot's embedding
            np.save(state.folder / f"test_embeddings_{method}.npy", cat.numpy())
        trial.set_user_attr("separate", separate)
        trial.set_user_attr("concatenated", concatenated)
        trial.set_user_attr("folds", per_fold)
        ExperimentLog(state.folder).reproduction(name, slot, n, seed, separate[T.OBJECTIVE],
                                                 concatenated[T.OBJECTIVE], time.perf_counter() - t0)
        return concatenated[T.OBJECTIVE]

    slots.run_slots(st, n, work)
    finished = slots.finished_trials(st)
    for t in finished:  # a NaN/inf reproduction keeps its slot (it was a real attempt) but has no test metrics
        if t.state != optuna.trial.TrialState.COMPLETE:
            print(f"warning: {name} reproduction {t.user_attrs.get(slots.SLOT)} failed: "
                  f"{t.user_attrs.get(slots.REASON)}", file=sys.stderr)
    done = [dict(t.user_attrs) for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise RuntimeError(f"{name}: every reproduction failed; see {state.storage_url}")
    return Reproduced(label, method, search, ccfg, dict(params), done)


def test_embeddings(state, rep: Reproduced, seed: int) -> Optional[np.ndarray]:
    """Reproduction ``seed``'s concatenated test embedding [N, folds * d] (``embeddings/``); when the file is missing
    (a reproduction finished before every embedding was kept, or by a worker on another machine) it is computed again
    from the fold models' ``best.pt`` and kept; None when those are not here either."""
    path = embeddings_path(state.folder, rep.label, rep.search, seed)
    if path.is_file():
        return np.load(path, allow_pickle=False)
    if not all((state.run_dir(rep.label, rep.ccfg, f, seed) / "best.pt").is_file()
               for f in range(len(state.split.folds))):
        return None
    test = np.asarray(state.split.test)
    try:
        embs = _fold_models_embed(state, rep.label, rep.ccfg, seed, test, rep.label, retrain=False)
    except DamagedFileError:
        return None
    cat = torch.cat([torch.nn.functional.normalize(e, dim=1) for e in embs], dim=1).numpy().astype(np.float32)
    _save_npy(path, cat)
    return cat


def space_measures(state, rep: Reproduced, seed: int, labels: np.ndarray) -> Optional[Dict[str, float]]:
    """Roth et al.'s embedding-space measures (``engine.diagnostics.embedding_space_metrics``) of reproduction
    ``seed``'s concatenated test embedding, kept beside it (``<seed>.space.json``) so that a rerun reads the same
    numbers; None without the embedding."""
    from ..engine.diagnostics import embedding_space_metrics
    path = embeddings_path(state.folder, rep.label, rep.search, seed).with_suffix(".space.json")
    if path.is_file():
        try:
            return {k: float(v) for k, v in read_json(path).items()}
        except (ValueError, AttributeError, TypeError):  # damaged: computed again
            pass
    emb = test_embeddings(state, rep, seed)
    if emb is None:
        return None
    values = {k: float(v) for k, v in embedding_space_metrics(emb, labels).items()}
    atomic_write_json(path, values)
    return values


def fold_health(state, rep: Reproduced, seed: int) -> List[Dict[str, float]]:
    """The XML health diagnostics of the last epoch of each fold of reproduction ``seed`` (``health`` of the last
    history entry of each run's ``result.json``); folds without them are left out."""
    out = []
    for f in range(len(state.split.folds)):
        path = state.run_dir(rep.label, rep.ccfg, f, seed) / "result.json"
        if not path.is_file():
            continue
        try:
            history = read_json(path).get("history") or []
        except ValueError:
            continue
        health = history[-1].get("health") if history and isinstance(history[-1], dict) else None
        if isinstance(health, dict) and health:
            out.append({k: float(v) for k, v in health.items() if isinstance(v, (int, float))})
    return out


def records(rep: Reproduced, dataset: str, embeddings=("separate", "concatenated"), with_search: bool = False,
            method: Optional[str] = None) -> tuple:
    """Plain records of ``rep`` for the report: ``(records, per_fold)``, one per embedding (or fold) and metric with
    ``dataset, method, embedding, metric, value, seed, reproduction`` (and ``search`` when ``with_search``);
    ``method`` relabels them (the attribution pairs "R at M's parameters" as the reference)."""
    who = method or rep.label
    extra = {"search": rep.search} if with_search else {}
    recs, per_fold = [], []
    for t in rep.trials:
        slot, seed = t.get(slots.SLOT), t["seed"]
        for emb in embeddings:
            for metric, value in t[emb].items():
                recs.append({"dataset": dataset, "method": who, "embedding": emb, "metric": metric, "value": value,
                             "seed": seed, "reproduction": slot, **extra})
        for fold, metrics in enumerate(t["folds"]):
            for metric, value in metrics.items():
                per_fold.append({"dataset": dataset, "method": who, "embedding": "fold", "metric": metric,
                                 "value": value, "seed": seed, "reproduction": slot, "fold": fold, **extra})
    return recs, per_fold
