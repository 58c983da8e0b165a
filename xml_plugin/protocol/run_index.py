"""``runs/index.csv`` and ``<run folder>/run.json``: which method, trial or reproduction, fold, seed and parameters a
run folder (``runs/<method>/<hash>``) trained, and the full config that :func:`xml_plugin.load_model` rebuilds."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..engine.io import atomic_write_json, read_json

INDEX = Path("runs") / "index.csv"
RUN_FILE = "run.json"
COLUMNS = ("hash", "method", "kind", "number", "fold", "seed", "params", "folder")
KINDS = ("trial", "reproduction")


def record_run(folder: Path, run_dir: Path, method: str, kind: str, number: int, fold: int, seed: int,
               params: Dict[str, Any], config: Optional[Dict[str, Any]] = None,
               resolved: Optional[Dict[str, Any]] = None) -> None:
    """Write ``run_dir/run.json`` and add a row to ``folder/runs/index.csv`` unless the same row is there already.

    ``kind`` is ``trial`` (search trial slot ``number``) or ``reproduction`` (reproduction ``number``); ``config`` is the
    resolved training config and ``resolved`` what ``auto`` resolved to (frozen blocks, image size ...).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    folder, run_dir = Path(folder), Path(run_dir)
    row = {"hash": run_dir.name, "method": method, "kind": kind, "number": int(number), "fold": int(fold),
           "seed": int(seed), "params": json.dumps(params, sort_keys=True, default=str),
           "folder": run_dir.relative_to(folder).as_posix()}
    info = {k: v for k, v in row.items() if k != "params"} | {"params": params, "config": config, "resolved": resolved}
    path = run_dir / RUN_FILE
    runs = read_json(path).get("runs", []) if path.is_file() else []
    entry = {k: info[k] for k in ("kind", "number", "fold", "seed", "params")}
    if entry not in runs:  # one folder can serve several units (a search trial and a reproduction with equal seeds)
        runs.append(entry)
    atomic_write_json(path, {"method": method, "config": config, "resolved": resolved, "runs": runs})
    index = folder / INDEX
    key = tuple(str(row[c]) for c in COLUMNS)
    if any(tuple(r[c] for c in COLUMNS) == key for r in read_index(folder)):
        return
    index.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    if not index.is_file():
        writer.writeheader()
    writer.writerow(row)
    # one write() of a whole line with O_APPEND: workers sharing the folder do not interleave rows
    fd = os.open(index, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, buf.getvalue().encode("utf-8"))
    finally:
        os.close(fd)


def read_index(folder: Path) -> List[Dict[str, str]]:
    """The rows of ``folder/runs/index.csv`` (empty when there is none), duplicates dropped, as strings."""
    index = Path(folder) / INDEX
    if not index.is_file():
        return []
    seen, out = set(), []
    with open(index, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("hash") == "hash":  # a second header written by a racing worker
                continue
            key = tuple(r.get(c) for c in COLUMNS)
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out


def read_run(run_dir: Path) -> Dict[str, Any]:
    """``run_dir/run.json``: method, config, resolved values and the units (kind, number, fold, seed) it served."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        from ..config import ConfigError
        raise ConfigError(f"{run_dir} has no {RUN_FILE}: it is not a run folder of an experiment (runs/<method>/<hash>), "
                          f"or it was trained by a version that did not record its config; rerun the experiment")
    return read_json(path)


__all__ = ["record_run", "read_index", "read_run", "INDEX", "RUN_FILE", "COLUMNS"]
