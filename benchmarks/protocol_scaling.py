"""Wall time of the main job and how the search scales with --n_trials and with several workers.

Runs ``run.py`` in subprocesses on the default data (the feature cache must already be built: run the main job once
first, or this script's first run pays for it) and reads the Optuna study for timings:

* ``--job``: the default main job (baseline + xml, default budget) end to end, wall time in seconds.
* search throughput: only the xml search (``--methods xml --reproductions 1``) with N trials, with 1 worker (all threads,
  then 1 thread) and with W workers (cores / W threads each) sharing one SQLite study; trials per hour are measured from the
  study's trial timestamps (first start to last completion), so start-up and the reproduction are not counted.

    python benchmarks/protocol_scaling.py --job --trials 2 4 8 --workers 2 --json /tmp/scaling.json
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


def run_workers(folder: Path, name: str, n_workers: int, extra: list, threads: int = 0) -> float:
    """``n_workers`` processes of the same command; ``threads`` > 0 sets each one's torch/faiss threads."""
    cmd = [sys.executable, str(REPO / "run.py"), "--experiment_name", name, "--experiment_folder", str(folder),
           "--no_progress", *extra]
    if threads:
        cmd += ["--general.num_threads", str(threads)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(n_workers)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"worker failed ({p.returncode}): {err[-2000:]}")
    return time.perf_counter() - t0


def search_throughput(folder: Path, name: str) -> dict:
    import optuna
    storage = f"sqlite:///{folder / name / 'optuna.db'}"
    study = optuna.load_study(study_name=f"{name}.xml.search", storage=storage)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    start = min(t.datetime_start for t in done)
    end = max(t.datetime_complete for t in done)
    seconds = (end - start).total_seconds()
    return {"trials": len(done), "search_seconds": seconds, "trials_per_hour": 3600 * len(done) / seconds,
            "workers": sorted({t.user_attrs.get("worker", "?").rpartition(":")[2] for t in done})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", action="store_true", help="also time the default main job end to end")
    ap.add_argument("--trials", type=int, nargs="*", default=[2, 4, 8], help="search budgets for one worker")
    ap.add_argument("--workers", type=int, default=2, help="workers for the multi-worker run (at the largest budget)")
    ap.add_argument("--folder", default=None, help="experiment folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="xml_scaling_"))
    results = {"load_average_before": os.getloadavg()}
    if args.job:
        name = f"job_{uuid.uuid4().hex[:6]}"
        results["main_job_seconds"] = run_workers(folder, name, 1, ["--loss", "multi_similarity"])
        print(f"main job (baseline + xml, default budget): {results['main_job_seconds']:.0f} s", flush=True)
    results["one_worker"] = []
    for n in args.trials:
        name = f"s1_{n}_{uuid.uuid4().hex[:6]}"
        wall = run_workers(folder, name, 1, ["--methods", "xml", "--n_trials", str(n), "--reproductions", "1"])
        row = {"n_trials": n, "wall_seconds": wall, **search_throughput(folder, name)}
        results["one_worker"].append(row)
        print(f"1 worker, {n} trials: search {row['search_seconds']:.0f} s, {row['trials_per_hour']:.0f} trials/h, "
              f"whole command {wall:.0f} s", flush=True)
    n = max(args.trials)
    search = ["--methods", "xml", "--n_trials", str(n), "--reproductions", "1"]
    name = f"s1t1_{n}_{uuid.uuid4().hex[:6]}"
    wall = run_workers(folder, name, 1, search, threads=1)
    results["one_worker_one_thread"] = {"n_trials": n, "wall_seconds": wall, **search_throughput(folder, name)}
    print(f"1 worker with 1 thread, {n} trials: {results['one_worker_one_thread']['trials_per_hour']:.0f} trials/h",
          flush=True)
    name = f"s{args.workers}_{n}_{uuid.uuid4().hex[:6]}"
    wall = run_workers(folder, name, args.workers, search, threads=max(1, (os.cpu_count() or 1) // args.workers))
    row = {"n_trials": n, "wall_seconds": wall, **search_throughput(folder, name)}
    results["multi_worker"] = {"workers": args.workers, **row}
    single = [r for r in results["one_worker"] if r["n_trials"] == n][0]
    results["speedup_trials_per_hour"] = row["trials_per_hour"] / single["trials_per_hour"]
    results["speedup_vs_one_thread_worker"] = row["trials_per_hour"] / results["one_worker_one_thread"]["trials_per_hour"]
    print(f"{args.workers} workers, {n} trials: search {row['search_seconds']:.0f} s, {row['trials_per_hour']:.0f} "
          f"trials/h = {results['speedup_trials_per_hour']:.2f}x one worker with all threads (target >= 1.6x: "
          f"{'PASS' if results['speedup_trials_per_hour'] >= 1.6 else 'FAIL'}), "
          f"{results['speedup_vs_one_thread_worker']:.2f}x one worker with the same threads per worker", flush=True)
    results["load_average_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
