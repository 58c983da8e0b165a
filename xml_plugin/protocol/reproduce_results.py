"""``run.py --reproduce_results FOLDER [--experiment_name NEW]``: a finished experiment (this project's folder, e.g.
downloaded) run again from what it recorded, under a new name on this machine, and its numbers checked against the
stored ones (powerful-benchmarker's ``--reproduce_results``; docs/export.md, "Reproducing a downloaded experiment").

What it reads: ``config.yaml`` (the merged config, the command line's overrides applied to it), ``experiment.json``
(the fingerprint: every method's resolved config, which also holds the overrides that won over a method's overlay;
package versions), ``reproductions.csv`` (every stored test number) and the provenance record of each run's
``result.json``. The stored folder is only read."""
from __future__ import annotations

import copy
import csv
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import config as C
from ..engine.io import atomic_write_text, read_json_checked
from .evaluate_saved import PROVENANCE_KEYS, folder_provenance, provenance_summary
from .experiment import NOT_RESULTS, Experiment, fingerprint_diff, result_view
from .identity import flat_leaves
from .names import NAME_RE, check_name

CHECK = "reproduction_check.md"
SUFFIX = ".reproduced-"
RTOL = 1e-6  # relative difference below which two numbers differ by float rounding only
EXACT, ROUNDING, DIFFERS = "exact", f"differs by float rounding (<{RTOL:g} relative)", "differs"
# settings that may be given with --reproduce_results: where and how it runs, never what it computes
KEPT = ("general.methods", "general.reference", "general.n_trials", "general.reproductions", "general.seed")
ALLOWED = tuple(f"{section}.{key}" for section, keys in NOT_RESULTS.items() if keys for key in keys
                if f"{section}.{key}" not in KEPT) + ("general.device", "dataset.root")
ALLOWED_SECTIONS = tuple(s for s, keys in NOT_RESULTS.items() if keys is None and s != C.METHOD_OVERRIDES)  # report

Key = Tuple[str, str, str, str, str, str]  # method, reproduction, seed, embedding, fold, metric


# ------------------------------------------------------------------------------------------ the stored folder
def open_finished(folder: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(config.yaml, experiment.json)`` of a finished experiment folder; ConfigError naming what is missing."""
    folder = Path(folder)
    what = f"--reproduce_results {folder}"
    if not folder.is_dir():
        raise C.ConfigError(f"{what}: no such folder; give the folder of a finished experiment, e.g. "
                            f"experiments/<name>")
    for name, why in (("config.yaml", "its merged config"), ("experiment.json", "its fingerprint"),
                      ("reproductions.csv", "the numbers to check, written when its reproductions finished")):
        if not (folder / name).is_file():
            raise C.ConfigError(f"{what}: not a finished experiment (no {name}: {why}); give the folder of an "
                                f"experiment that ran to its report, e.g. experiments/<name>")
    info = read_json_checked(folder / "experiment.json", "take the folder again from where it came")
    if not isinstance(info, dict) or not isinstance(info.get("fingerprint"), dict):
        raise C.ConfigError(f"{what}: its experiment.json holds no fingerprint (an older version of this benchmark "
                            f"made it); it cannot be rerun as it ran")
    return C.load_yaml(folder / "config.yaml"), info


def default_name(recorded: str, stamp: Optional[str] = None) -> str:
    """``<recorded>.reproduced-<YYYYmmdd-HHMMSS>``, the recorded name shortened to keep it a valid name."""
    suffix = SUFFIX + (stamp or time.strftime("%Y%m%d-%H%M%S"))
    return recorded[: 100 - len(suffix)] + suffix


def check_overrides(overrides: Sequence[Tuple[str, Any]]) -> None:
    """Only settings that do not change what is computed (ALLOWED) may be given: the rest is the recorded config."""
    for path, _ in overrides:
        key = path.split("~")[0]
        if key not in ALLOWED and key.split(".")[0] not in ALLOWED_SECTIONS:
            raise C.ConfigError(f"--{path}: --reproduce_results reruns the recorded configuration; only where and how "
                                f"it runs may be set ({', '.join('--' + a for a in ALLOWED + ALLOWED_SECTIONS)}); "
                                f"to change the configuration, run a new experiment")


def method_fixes(recorded: Dict[str, Any], now: Dict[str, Any]) -> Dict[str, Any]:
    """The ``method_overrides.<method>`` values that turn the method config ``now`` (config.yaml + the overlay) into
    the ``recorded`` one (experiment.json's fingerprint): every leaf that differs set to its recorded value, a leaf
    the record lacks set to null (a null and a missing key are the same setting). The ``general`` section stays
    config.yaml's (where and how it runs)."""
    a = {k: v for k, v in flat_leaves(recorded).items() if not k.startswith("general.")}
    b = {k: v for k, v in flat_leaves(now).items() if not k.startswith("general.")}
    fixes: Dict[str, Any] = {}
    for path in sorted(set(a) | set(b)):
        if a.get(path) == b.get(path):
            continue
        if path not in a and any(k.startswith(path + ".") or path.startswith(k + ".") for k in a):
            continue  # inside or above a recorded leaf that is set itself
        C.set_path(fixes, path, copy.deepcopy(a.get(path)))
    return fixes


def rebuild_config(cfg: Dict[str, Any], fingerprint: Dict[str, Any], name: str, progress: bool) -> Dict[str, Any]:
    """``cfg`` (config.yaml) with the per-method values that make every method's config the recorded one: the
    command line's overrides that won over a method's overlay are in the fingerprint, not in config.yaml."""
    exp = Experiment(cfg, name, progress=progress)
    fixes = {}
    for method in exp.methods:
        recorded = (fingerprint.get("methods") or {}).get(method)
        if isinstance(recorded, dict):
            fix = method_fixes(recorded, result_view(exp.method_config(method)))
            if fix:
                fixes[method] = fix
    if not fixes:
        return cfg
    out = copy.deepcopy(cfg)
    out[C.METHOD_OVERRIDES] = C.merge(out.get(C.METHOD_OVERRIDES) or {}, fixes)
    return out


# ------------------------------------------------------------------------------------------ the check
def read_reproductions(path: Path) -> Dict[Key, float]:
    """``reproductions.csv`` (report.reproductions_to_csv) keyed by method, reproduction, seed, embedding, fold and
    metric."""
    out: Dict[Key, float] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            try:
                out[(r["method"], r["reproduction"], r["seed"], r["embedding"], r["fold"] or "", r["metric"])] = \
                    float(r["value"])
            except (KeyError, TypeError, ValueError):
                raise C.ConfigError(f"{path}: not a reproductions.csv written by this benchmark (row {r}); take the "
                                    f"folder again from where it came") from None
    return out


def classify(stored: Optional[float], reproduced: Optional[float]) -> str:
    """``exact`` (equal floats, or both NaN), float rounding (``|a - b| <= RTOL max(|a|, |b|)``), ``differs``; a
    number on one side only is ``not reproduced`` / ``not stored``."""
    if reproduced is None:
        return "not reproduced"
    if stored is None:
        return "not stored"
    if stored == reproduced or (math.isnan(stored) and math.isnan(reproduced)):
        return EXACT
    if abs(stored - reproduced) <= RTOL * max(abs(stored), abs(reproduced)):
        return ROUNDING
    return DIFFERS


def compare(stored: Dict[Key, float], reproduced: Dict[Key, float]) -> List[Dict[str, Any]]:
    """One row per number of either side: key, stored, reproduced, difference (reproduced - stored), check."""
    rows = []
    for key in sorted(set(stored) | set(reproduced), key=lambda k: (k[0], int(k[1]), k[3] != "fold", k[3], k[4], k[5])):
        a, b = stored.get(key), reproduced.get(key)
        rows.append({"key": key, "stored": a, "reproduced": b,
                     "difference": None if a is None or b is None else b - a, "check": classify(a, b)})
    return rows


def _values(records: Sequence[Optional[Dict[str, Any]]], key: str, versions: Dict[str, Any]) -> str:
    seen = sorted({str(r[key]) for r in records if r and key in r})
    if seen:
        return ", ".join(seen)
    return f"{versions[key]} (experiment.json)" if key in versions else "(not recorded)"


def fingerprint_rows(stored_folder: Path, new_folder: Path, stored_info: Dict[str, Any],
                     new_info: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """``(what, stored, reproduced)``: the runs' provenance (world size, threads, device, versions), experiment.json's
    versions, then every key of the configuration fingerprint that differs."""
    a, b = folder_provenance(stored_folder), folder_provenance(new_folder)
    va, vb = stored_info.get("versions") or {}, new_info.get("versions") or {}
    rows = [(k, _values(a, k, va), _values(b, k, vb)) for k in PROVENANCE_KEYS]
    rows += [(k, str(va.get(k, "(not recorded)")), str(vb.get(k, "(not recorded)")))
             for k in sorted(set(va) | set(vb)) if k not in PROVENANCE_KEYS]
    for line in fingerprint_diff(stored_info.get("fingerprint") or {}, new_info.get("fingerprint") or {}):
        path, change = line.split(": ", 1)
        old, new = change.split(" -> ", 1)
        rows.append((f"config {path}", old, new))
    return rows


def _number(v: Optional[float], sign: bool = False) -> str:
    return "–" if v is None else (f"{v:+.3g}" if sign else f"{v:.10g}")


def check_table(stored_name: str, new_name: str, rows: List[Dict[str, Any]], fp_rows: List[Tuple[str, str, str]],
                stored_where: str, new_where: str) -> str:
    """The markdown of ``reproduction_check.md``: the counts, where each side was computed, the fingerprint
    differences, then every number."""
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r["check"]] = counts.get(r["check"], 0) + 1
    verdict = ("every number reproduced exactly" if counts.get(EXACT) == len(rows) and rows else
               ", ".join(f"{n} {c}" for c, n in sorted(counts.items(), key=lambda x: -x[1])))
    lines = [f"# Reproduction of {stored_name} as {new_name}", "",
             f"**{len(rows)} test numbers (reproductions.csv): {verdict}.** `difference` is reproduced - stored; "
             f"`{ROUNDING}` means |difference| <= {RTOL:g} x the larger magnitude.", "",
             f"- stored runs: {stored_where}", f"- reproduced runs: {new_where}", "",
             "## Fingerprint", "", "| what | stored | reproduced | |", "|---|---|---|---|"]
    for what, a, b in fp_rows:
        lines.append(f"| {what} | {a} | {b} | {'same' if a == b else '**differs**'} |")
    lines += ["", "## Numbers", "",
              "| method | reproduction | seed | embedding | metric | stored | reproduced | difference | check |",
              "|---|---:|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        method, rep, seed, emb, fold, metric = r["key"]
        emb = f"fold {fold}" if emb == "fold" else emb
        lines.append(f"| {method} | {rep} | {seed} | {emb} | {metric} | {_number(r['stored'])} | "
                     f"{_number(r['reproduced'])} | {_number(r['difference'], sign=True)} | {r['check']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the command
def reproduce_results(folder: Path, name: Optional[str] = None, overrides: Sequence[Tuple[str, Any]] = (),
                      progress: bool = True) -> Tuple[str, Optional[Path]]:
    """Run the experiment in ``folder`` again as ``name`` (default ``<name>.reproduced-<time>``) in the local
    experiments folder (``general.experiment_folder`` of this machine, or ``--experiment_folder``), then write and
    return the check (``NEW/reproduction_check.md``) and its path. Rerunning with the same ``name`` resumes the
    reproduction. Under torchrun the ranks other than 0 return ``("", None)``."""
    folder = Path(folder)
    cfg, info = open_finished(folder)
    check_overrides(overrides)
    recorded = info.get("name") if isinstance(info.get("name"), str) and NAME_RE.fullmatch(info["name"]) \
        else folder.resolve().name
    name = check_name(name if name is not None else default_name(recorded))
    cfg.setdefault("general", {})["experiment_folder"] = C.load({})["general"]["experiment_folder"]
    cfg["general"]["storage"] = None  # the reproduction's own study, in its folder (--storage to share one)
    cache = (cfg.get("cache") or {}).get("folder")
    if cache and not Path(cache).is_dir():  # another machine's cache folder: this machine's default one
        cfg["cache"]["folder"] = None
    cfg = rebuild_config(cfg, info["fingerprint"], name, progress)
    exp = Experiment(cfg, name, progress=progress, overrides=overrides)
    if exp.folder.resolve() == folder.resolve():
        raise C.ConfigError(f"--experiment_name {name}: that is the stored experiment's own folder; give the "
                            f"reproduction another name (default: {default_name(recorded, 'TIME')})")
    given = tuple(path.split("~")[0] for path, _ in overrides)  # set on purpose: listed in the check
    for method in exp.methods:
        recorded_cfg = (info["fingerprint"].get("methods") or {}).get(method)
        left = [k for k in sorted(flat_leaves(method_fixes(recorded_cfg, result_view(exp.method_config(method)))))
                if not k.startswith(given)] if isinstance(recorded_cfg, dict) else []
        if left:
            print(f"warning: {method}'s recorded configuration could not be rebuilt exactly ({', '.join(left[:6])}); "
                  f"the check lists the differences", file=sys.stderr)
    if not exp.run():  # a torchrun rank other than 0
        return "", None
    new_info = read_json_checked(exp.folder / "experiment.json")
    rows = compare(read_reproductions(folder / "reproductions.csv"),
                   read_reproductions(exp.folder / "reproductions.csv"))
    md = check_table(recorded, name, rows, fingerprint_rows(folder, exp.folder, info, new_info),
                     provenance_summary(folder_provenance(folder)), provenance_summary(folder_provenance(exp.folder)))
    atomic_write_text(exp.folder / CHECK, md)
    return md, exp.folder / CHECK


__all__ = ["reproduce_results", "open_finished", "method_fixes", "compare", "classify", "check_table",
           "read_reproductions", "default_name", "CHECK"]
