"""``run.py --evaluate EXPERIMENT [--split test|val] [--export]``: the saved models of a finished experiment's
reproductions tested again without training (per fold, their mean and the concatenated embedding), and on request
their embeddings written with labels and image paths (docs/export.md)."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import optuna
import torch

from .. import config as C
from ..engine import train as T
from ..engine.evaluate import fold_ensemble_metrics, mean_metrics, query_gallery, split_metrics
from ..engine.io import read_json, read_json_checked
from . import slots
from .experiment import Experiment
from .names import NAME_RE, study_name
from .run_index import read_index, read_run

SPLITS = ("test", "val")
EXPORT = "export"
# the record xml_plugin.engine.train.provenance() writes into every run's result.json
PROVENANCE_KEYS = ("world_size", "torch_threads", "device", "device_name", "torch", "pytorch_metric_learning", "faiss")


class SavedExperiment(Experiment):
    """An experiment folder opened to read: the set-up (data, splits, trunk, feature cache) without claiming or
    rewriting the folder."""

    def _claim_folder(self, dataset, split) -> None:
        path = self.folder / "splits.json"
        if not path.is_file() or read_json(path) != split.to_dict():
            raise C.ConfigError(f"{self.folder}: its splits.json differs from the splits its config.yaml makes now (the "
                                f"data set changed?); the saved models cannot be tested on the same images")


def open_experiment(folder: Path, progress: bool = True) -> SavedExperiment:
    """The finished experiment in ``folder`` (``experiments/<name>``), set up on its own ``config.yaml``."""
    folder = Path(folder)
    if not (folder / "config.yaml").is_file():
        raise C.ConfigError(f"--evaluate {folder}: not an experiment folder (no config.yaml there); give the folder "
                            f"of a run experiment, e.g. experiments/<name>")
    cfg = C.load_yaml(folder / "config.yaml")
    cfg["general"]["experiment_folder"] = str(folder.resolve().parent)
    exp = SavedExperiment(cfg, folder.resolve().name, progress=progress)
    info = folder / "experiment.json"
    if info.is_file():  # a folder copied or renamed (a download, a --restart backup) keeps its studies' names
        recorded = read_json_checked(info, "take the folder again from where it came").get("name")
        if isinstance(recorded, str) and NAME_RE.fullmatch(recorded):
            exp.study_prefix = recorded
    exp.setup()
    return exp


def _run_folder(exp: Experiment, index: List[Dict[str, str]], method: str, slot: int, fold: int, seed: int,
                params: Dict[str, Any]) -> Path:
    """The run folder of reproduction ``slot``'s fold (from runs/index.csv; else from the config as it resolves now)."""
    for r in index:
        if (r["method"], r["kind"], int(r["number"]), int(r["fold"]), int(r["seed"])) == (method, "reproduction", slot,
                                                                                        fold, seed):
            return exp.folder / r["folder"]
    return exp.run_dir(method, C.resolve(exp.method_config(method), params), fold, seed)


def _model(exp: Experiment, run_dir: Path, method: str, params: Dict[str, Any]):
    if not (run_dir / "best.pt").is_file():
        raise C.ConfigError(f"{run_dir} holds no saved model (best.pt): the reproduction did not finish; rerun the "
                            f"experiment to finish it, then --evaluate")
    if (run_dir / "run.json").is_file():
        info = read_run(run_dir)
        if info.get("resolved") != exp.resolved:
            raise C.ConfigError(f"{run_dir} was trained with {info.get('resolved')} but here resolves to "
                                f"{exp.resolved}; evaluate with the same --device as the experiment")
        ccfg = info["config"]
    else:
        ccfg = C.resolve(exp.method_config(method), params)
    return T.load_best(ccfg, exp.ctx, run_dir)


def evaluate_experiment(folder: Path, split: str = "test", export: bool = False,
                        progress: bool = True) -> Dict[str, List[Dict[str, Any]]]:
    """Per method, per finished reproduction: ``{"reproduction", "seed", "folds": [metrics], "separate": metrics,
    "concatenated": metrics or None (val), "provenance": [each fold run's record, or None], "stored": the test metrics
    recorded when it ran}``."""
    if split not in SPLITS:
        raise C.ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    exp = open_experiment(folder, progress)
    ctx, index = exp.ctx, read_index(exp.folder)
    ds = ctx.dataset
    eval_bs = int(exp.cfg.get("eval", {}).get("batch_size", 128))
    n_folds = len(exp.split.folds)
    if split == "test":
        test = np.asarray(exp.split.test)
        parts = [test] * n_folds
        is_q, is_g = query_gallery(ds, test)
    else:
        parts = [np.asarray(va) for _, va in exp.split.folds]  # fold f's model on fold f's validation classes
        is_q = is_g = None
    out_dir = exp.folder / EXPORT / split
    if export:
        write_items(out_dir, ds, parts if split == "val" else parts[:1], is_q, is_g)
    results: Dict[str, List[Dict[str, Any]]] = {}
    for method in exp.methods:
        try:
            study = optuna.load_study(study_name=study_name(exp.study_prefix, method, "reproductions"), storage=exp.storage)
        except KeyError:
            raise C.ConfigError(f"{exp.folder}: method {method!r} has no reproductions yet; finish the experiment "
                                f"(rerun its command), then --evaluate") from None
        done = [t for t in slots.finished_trials(study) if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            raise C.ConfigError(f"{exp.folder}: method {method!r} has no finished reproduction; finish the "
                                f"experiment (rerun its command), then --evaluate")
        results[method] = []
        for t in done:
            slot, seed, params = t.user_attrs[slots.SLOT], t.user_attrs["seed"], t.user_attrs.get("params") or {}
            embs, where = [], []
            for f in range(n_folds):
                run_dir = _run_folder(exp, index, method, slot, f, seed, params)
                model = _model(exp, run_dir, method, params)
                where.append(run_provenance(run_dir))
                e = T.embed(model, ctx, parts[f], eval_bs)  # [N, d]
                embs.append(e)
                if export:
                    name = f"rep{slot}_fold{f}.npy"
                    (out_dir / method).mkdir(parents=True, exist_ok=True)
                    np.save(out_dir / method / name, e.numpy().astype(np.float32))
            concatenated = None
            if split == "test":  # every fold model embeds the same test samples
                per_fold, separate, concatenated, cat = fold_ensemble_metrics(
                    embs, torch.as_tensor(ctx.labels[parts[0]]), is_q, is_g, recall_ks=exp.recall_ks)
                if export:
                    np.save(out_dir / method / f"rep{slot}_concatenated.npy", cat.numpy().astype(np.float32))
            else:  # fold f's model on fold f's own validation classes: no concatenation
                per_fold = [split_metrics(e, torch.as_tensor(ctx.labels[parts[f]]), recall_ks=exp.recall_ks)
                            for f, e in enumerate(embs)]
                separate = mean_metrics(per_fold)
            results[method].append({"reproduction": slot, "seed": seed, "folds": per_fold, "separate": separate,
                                    "concatenated": concatenated, "provenance": where,
                                    "stored": {k: t.user_attrs.get(k) for k in ("folds", "separate", "concatenated")}})
    write_metrics(exp.folder / f"evaluate_{split}.csv", results)
    if export:
        write_metrics(out_dir / "metrics.csv", results)
    return results


def write_items(out_dir: Path, dataset, parts: List[np.ndarray], is_q: Optional[np.ndarray],
                is_g: Optional[np.ndarray]) -> None:
    """``items.csv`` (test) or ``items_fold<f>.csv`` (val): row i describes row i of the matching embedding files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f, idx in enumerate(parts):
        name = "items.csv" if len(parts) == 1 else f"items_fold{f}.csv"
        with open(out_dir / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["index", "label", "class_name", "path"] + (["is_query", "is_gallery"] if is_q is not None else []))
            for row, i in enumerate(idx):
                label = int(dataset.labels[i])
                extra = [bool(is_q[row]), bool(is_g[row])] if is_q is not None else []
                w.writerow([int(i), label, dataset.class_names[label], str(dataset.paths[i])] + extra)


def write_metrics(path: Path, results: Dict[str, List[Dict[str, Any]]]) -> None:
    """One row per method, reproduction, embedding (``fold<f>`` / ``separate`` / ``concatenated``) and metric."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "reproduction", "seed", "embedding", "metric", "value"])
        for method, reps in results.items():
            for r in reps:
                blocks = [(f"fold{f}", m) for f, m in enumerate(r["folds"])] + [("separate", r["separate"])]
                blocks += [("concatenated", r["concatenated"])] if r["concatenated"] is not None else []
                for emb, metrics in blocks:
                    for k, v in metrics.items():
                        w.writerow([method, r["reproduction"], r["seed"], emb, k, repr(float(v))])


def run_provenance(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The ``provenance`` record of a run folder's ``result.json`` (None: written before runs recorded it, or
    unreadable)."""
    try:
        record = read_json(Path(run_dir) / "result.json").get("provenance")
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) else None


def folder_provenance(folder: Path) -> List[Optional[Dict[str, Any]]]:
    """The provenance record of every run folder (``runs/<method>/<hash>``) of an experiment folder."""
    return [run_provenance(d) for d in sorted(Path(folder).glob("runs/*/*")) if d.is_dir()]


def describe_provenance(record: Dict[str, Any]) -> str:
    """``computed by 1 process, 1 torch thread, cpu; torch 2.14.1, pytorch-metric-learning 2.9.0, faiss 1.15.1``."""
    n, threads = record.get("world_size", "?"), record.get("torch_threads", "?")
    device, name = record.get("device", "?"), record.get("device_name")
    where = device if name in (None, "cpu", device) else f"{device} ({name})"
    procs = "1 process" if n == 1 else f"{n} processes (a DDP group)"
    return (f"computed by {procs}, {threads} torch thread{'' if threads == 1 else 's'}, {where}; "
            f"torch {record.get('torch', '?')}, pytorch-metric-learning {record.get('pytorch_metric_learning', '?')}, "
            f"faiss {record.get('faiss', '?')}")


def provenance_summary(records: Sequence[Optional[Dict[str, Any]]]) -> str:
    """One line saying where runs were computed; when they differ, each kind with its count and the keys that
    differ; runs without a record (older versions) counted apart."""
    known = [r for r in records if r]
    missing = len(records) - len(known)
    if not records:
        return "no runs"
    if not known:
        return f"{missing} run{'' if missing == 1 else 's'} record no provenance (written by an older version)"
    kinds = Counter(json.dumps(r, sort_keys=True) for r in known)
    if len(kinds) == 1 and not missing:
        return f"{describe_provenance(known[0])} (all {len(known)} runs)"
    parts = [f"{n} run{'' if n == 1 else 's'} {describe_provenance(json.loads(k))}" for k, n in kinds.most_common()]
    if missing:
        parts.append(f"{missing} run{'' if missing == 1 else 's'} record no provenance (written by an older version)")
    keys = sorted({k for r in known for k in set(r) | set(known[0]) if r.get(k) != known[0].get(k)})
    note = f"the runs differ in {', '.join(keys)}: " if keys else "the runs differ: "
    return note + "; ".join(parts)


def summary(results: Dict[str, List[Dict[str, Any]]], split: str) -> str:
    """A markdown table: one row per method, reproduction and embedding; one column per metric; then where the
    evaluated runs were trained (their provenance records)."""
    metrics = list(dict.fromkeys(k for reps in results.values() for r in reps for k in r["separate"]))
    lines = [f"| method | reproduction | seed | {split} embedding | " + " | ".join(metrics) + " |",
             "|---|---:|---:|---|" + "---:|" * len(metrics)]
    for method, reps in results.items():
        for r in reps:
            for emb in ("separate", "concatenated"):
                if r[emb] is not None:
                    lines.append(f"| {method} | {r['reproduction']} | {r['seed']} | {emb} | "
                                 + " | ".join(f"{100 * r[emb].get(m, float('nan')):.2f}" for m in metrics) + " |")
    where = [p for reps in results.values() for r in reps for p in r.get("provenance", ())]
    lines += ["", f"Stored runs: {provenance_summary(where)}."]
    return "\n".join(lines)


__all__ = ["evaluate_experiment", "open_experiment", "SavedExperiment", "summary", "write_metrics", "write_items",
           "run_provenance", "folder_provenance", "describe_provenance", "provenance_summary", "PROVENANCE_KEYS"]
