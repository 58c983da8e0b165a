"""An experiment's identity: the fingerprint of what decides its results, the atomic claim of its folder (refused
when the folder holds another configuration's results), ``--restart`` (the old folder and its own studies kept under a
backup name), and its Optuna studies, each refused when another configuration made it. Takes the state
(``state.ExperimentState``); names are checked in ``names``."""
from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import optuna
import torch

from .. import config as C
from .. import registry
from ..engine.io import atomic_write_json, read_json, read_json_checked, stable_hash
from .configs import METHOD_OVERRIDES, without_later_nulls
from .names import owns_study, study_name
from .storage import damaged_storage, db_errors, open_storage

NOT_RESULTS = {"general": ("experiment_folder", "storage", "num_threads", "workers", "heartbeat_seconds", "methods",
                            "reference",
                            "n_trials", "reproductions", "seed",
                            "searches", "attribution"),  # the budget is recorded apart; these two add runs
               "trainer": ("num_workers", "logs"), "eval": ("batch_size",), "cache": ("folder", "batch_size"),
               "report": None, METHOD_OVERRIDES: None}


def result_view(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``cfg`` without what cannot change a result (folders, storage, threads, logging; the budget is kept apart)."""
    out = copy.deepcopy(cfg)
    for section, keys in NOT_RESULTS.items():
        if keys is None:
            out.pop(section, None)
        elif isinstance(out.get(section), dict):
            for k in keys:
                out[section].pop(k, None)
    return out


def without_nulls(d: Any) -> Any:
    """``d`` without null values (a default added later as null does not change a configuration)."""
    if isinstance(d, dict):
        return {k: without_nulls(v) for k, v in d.items() if v is not None}
    return d


def flat_leaves(d: Any, prefix: str = "") -> Dict[str, Any]:
    """Dotted leaf paths of a config (a search marker, an empty mapping or a list is one leaf)."""
    out: Dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v and not C.is_search_marker(v):
            out.update(flat_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint_diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """``'path: old -> new'`` for every leaf that differs (methods compared where both have them)."""
    a = flat_leaves({"shared": old.get("shared"), "methods": {m: c for m, c in old.get("methods", {}).items()
                                                        if m in new.get("methods", {})}})
    b = flat_leaves({"shared": new.get("shared"), "methods": {m: c for m, c in new.get("methods", {}).items()
                                                        if m in old.get("methods", {})}})
    # a key that is missing on one side and null on the other is the same setting (a default added later as null)
    return [f"{k.removeprefix('shared.').removeprefix('budget.')}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def rename_studies(storage, old: str, new: str) -> None:
    """Rename experiment ``old``'s own studies (:func:`owns_study`) to experiment ``new``'s in ``storage``."""
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if owns_study(old, summary.study_name):
            optuna.copy_study(from_study_name=summary.study_name, from_storage=storage, to_storage=storage,
                              to_study_name=f"{new}{summary.study_name[len(old):]}")
            optuna.delete_study(study_name=summary.study_name, storage=storage)


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive lock on an experiment folder (flock on the directory itself: nothing is written to take it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def fingerprint(state, dataset) -> Dict[str, Any]:
    """What decides this experiment's results: every method's config (overlays, overrides, search markers),
    the values ``auto`` resolved to here (device type, frozen blocks, cache views, image size), the budget and
    the data set's content. ``general.searches`` and ``general.attribution`` are not in it: they add studies and run
    folders next to the existing ones and change none of them."""
    g = state.cfg["general"]
    return {"methods": {m: without_later_nulls(result_view(state.method_config(m))) for m in state.methods},
            "shared": {"resolved": state.resolved, "dataset": dataset.fingerprint(),
                       "budget": {"n_trials": g["n_trials"], "reproductions": g["reproductions"],
                                  "search_mode": state.search_mode, "seed": g.get("seed", 0)}}}


def method_fingerprint(state, method: str) -> str:
    """The hash of one method's result view (nulls dropped), stored in its studies."""
    return stable_hash(without_nulls(result_view(state.method_config(method))))


def claim_folder(state, dataset, split) -> None:
    """Refuse a folder that holds another configuration's results (nothing is written then); else write
    ``config.yaml``, ``splits.json`` and ``experiment.json`` (fingerprint, versions). Atomic: a new folder is
    written under a temporary name and renamed into place, so of two workers starting one experiment with
    different configurations one owns the folder and the other is refused without writing anything; an existing
    folder is checked and updated under a lock. Sets ``state.fingerprint_hash``."""
    fp = fingerprint(state, dataset)
    state.fingerprint_hash = stable_hash(fp["shared"])
    folder = state.folder
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{state.name}.claim-", dir=folder.parent))
        try:
            write_identity(state, tmp, fp, split, write_splits=True)
            os.rename(tmp, folder)  # fails when another worker's folder is there first
            return
        except OSError:
            if not folder.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    with folder_lock(folder):
        path = folder / "experiment.json"
        old = read_json_checked(path, "move it away, or --restart to start the experiment over") \
            if path.is_file() else None
        if old is not None:
            before = old.get("fingerprint")
            if before is None:
                raise C.ConfigError(f"{folder} was made by an older version of this benchmark without a "
                                    f"fingerprint: use a new --experiment_name, or --restart to start it over "
                                    f"(the old folder is kept as a backup)")
            diffs = fingerprint_diff(before, fp)
            if diffs:
                shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
                raise C.ConfigError(f"experiment {state.name!r} was run with another configuration ({shown}): use "
                                    f"a new --experiment_name, or add --restart to start it over (the old folder "
                                    f"is kept as a backup)")
            fp["methods"] = {**before["methods"], **fp["methods"]}
        split_path = folder / "splits.json"
        if split_path.is_file() and read_json_checked(split_path, "--restart to start the experiment over") \
                != split.to_dict():
            raise C.ConfigError(f"{split_path} holds other splits than this config makes (another data set or "
                                f"options?); use a new --experiment_name, or add --restart to start the "
                                f"experiment over")
        write_identity(state, folder, fp, split, write_splits=not split_path.is_file())


def write_identity(state, folder: Path, fp: Dict[str, Any], split, write_splits: bool) -> None:
    """``config.yaml``, ``splits.json`` (when asked) and ``experiment.json`` of ``state`` into ``folder``."""
    import pytorch_metric_learning
    C.dump(state.cfg, folder / "config.yaml")
    if write_splits:
        split.save(folder / "splits.json")
    atomic_write_json(folder / "experiment.json", {
        "name": state.name, "dataset": state.cfg["dataset"]["name"], "loss": registry.split_spec(state.cfg["loss"])[0],
        "methods": state.methods, "reference": state.reference,
        "storage": state.storage_url if not state.cfg["general"].get("storage") else "(given)",
        "versions": {"torch": torch.__version__, "pytorch_metric_learning": pytorch_metric_learning.__version__,
                     "optuna": optuna.__version__},
        "fingerprint": fp})


def restart(state) -> Optional[Path]:
    """``--restart``: move the experiment folder to ``<name>.backup-<time>`` and rename its studies (in the storage
    in the folder, or in a shared one) to the backup's name, so that the backup stays a complete experiment that
    ``--evaluate`` opens. Only this experiment's own folder and studies (:func:`names.owns_study`) are touched.
    Returns the backup folder (None: nothing to keep)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = state.folder.with_name(f"{state.folder.name}.backup-{stamp}")
    if state.cfg["general"].get("storage"):
        rename_studies(state.storage, state.name, backup.name)
    if not state.folder.exists():
        return None
    state.folder.rename(backup)
    info, recorded = backup / "experiment.json", None
    try:
        recorded = read_json(info) if info.is_file() else None
    except ValueError:  # a damaged experiment.json: the backup keeps it as it was
        pass
    db = backup / "optuna.db"
    if not state.cfg["general"].get("storage") and db.is_file():  # its studies carry the recorded name
        owner = recorded.get("name") if isinstance(recorded, dict) else None
        rename_studies(open_storage(f"sqlite:///{db.resolve()}", 5), owner or state.name, backup.name)
    if isinstance(recorded, dict):
        atomic_write_json(info, {**recorded, "name": backup.name})
    return backup


ROLES = {"search": "search trials (one per slot; surplus/retried trials are bookkeeping)",
         "reproductions": "reproductions of the best search trial, tested"}


def study(state, label: str, part: str, sampler: optuna.samplers.BaseSampler, search: int = 0,
          owner: Optional[str] = None, role: Optional[str] = None) -> optuna.Study:
    """The study ``names.study_name(prefix, label, part, search)`` in the experiment's storage, created or loaded.
    Workers sharing a storage must run the same configuration: the study keeps the hash of the shared fingerprint and
    of ``label``'s method config (``owner``: the method whose config it is, when ``label`` is an attribution label);
    another hash is refused (ConfigError)."""
    g = state.cfg["general"]
    search_cfg = state.cfg.get("search", {})
    pruner = optuna.pruners.MedianPruner(n_startup_trials=int(search_cfg.get("pruner_startup_trials", 3))) \
        if g.get("pruner", "none") == "median" else optuna.pruners.NopPruner()
    try:
        out = optuna.create_study(study_name=study_name(state.study_prefix, label, part, search),
                                  storage=state.storage, direction="maximize", sampler=sampler, pruner=pruner,
                                  load_if_exists=True)
    except (optuna.exceptions.StorageInternalError, db_errors()) as exc:
        raise damaged_storage(state.storage_url, exc) from None
    mine = {"shared": state.fingerprint_hash, "method": method_fingerprint(state, owner or label)}
    if owner is not None and owner != label:
        mine["label"] = label
    mine = stable_hash(mine)
    theirs = out.user_attrs.get("fingerprint")
    if theirs is None:
        out.set_user_attr("fingerprint", mine)
        out.set_user_attr("role", role or ROLES[part])
    elif theirs != mine:
        raise C.ConfigError(f"the study {out.study_name} in {state.storage_url} was made with another "
                            f"configuration of {owner or label!r} (another worker's or an earlier run's): use the same "
                            f"config on every worker, or a new --experiment_name")
    return out
