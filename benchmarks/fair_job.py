"""Wall time of the fair main job, warm (the data set and the feature cache already built).

    python benchmarks/fair_job.py                       # the main job: baseline + xml, 8 trials, 10 reproductions
    python benchmarks/fair_job.py --full                # also the Reality Check's budget: baseline + xml + gsp,
                                                        # 50 trials x 4 folds + 10 reproductions each
    python benchmarks/fair_job.py --extra --config_models tail   # the same in another regime

Runs ``run.py`` in a subprocess in a temporary experiment folder: first a one-fold warm-up on the same data and
transforms (builds the data set and the feature cache if they are missing, not timed), then the timed job. Prints the
wall time, the number of fold trainings and the seconds per fold training, read from the Optuna studies.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(folder: Path, name: str, words: list) -> float:
    cmd = [sys.executable, str(REPO / "run.py"), "--experiment_name", name, "--experiment_folder", str(folder),
           "--no_progress", *words]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-3000:]}")
    return time.perf_counter() - t0


def fold_trainings(folder: Path, name: str) -> int:
    return sum(1 for _ in (folder / name / "runs").rglob("result.json"))


def job(folder: Path, label: str, words: list) -> dict:
    name = f"{label}_{uuid.uuid4().hex[:6]}"
    run(folder, f"warm_{name}", [*words, "--methods", "baseline", "--search", "none", "--reproductions", "1"])
    load = os.getloadavg()
    seconds = run(folder, name, words)
    n = fold_trainings(folder, name)
    out = {"job": label, "words": words, "seconds": round(seconds, 1), "fold_trainings": n,
           "seconds_per_fold": round(seconds / max(n, 1), 2), "load_average_before": load,
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also the Reality Check budget for baseline + xml + gsp")
    ap.add_argument("--skip_main", action="store_true", help="skip the main job")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more run.py words for every job")
    ap.add_argument("--folder", default=None, help="experiment folder (default: a temporary one)")
    args = ap.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="xml_fair_job_"))
    base = ["--loss", "multi_similarity", *args.extra]
    if not args.skip_main:
        job(folder, "main", base)
    if args.full:
        job(folder, "full", [*base, "--methods", "baseline", "xml", "gsp", "--n_trials", "50", "--reproductions", "10"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
