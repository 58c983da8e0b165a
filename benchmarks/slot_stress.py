"""Two workers on one new study, many times: duplicate slots and counted trials of ``protocol/slots.py``.

Two worker processes (multiprocessing, spawn; started once, since importing the package costs seconds) are sent the
same new study ``--rounds`` times. In every round both open the storage, create the study and call ``run_slots`` at
the same instant, with a trivial objective: a parameter drawn by a sampler seeded by the slot, a few milliseconds of
sleep. SQLite gets a new database file per round (so the workers also race to create the schema); PostgreSQL (with
``--postgres URL`` or the environment variable ``XML_PLUGIN_TEST_POSTGRES_URL``) gets a new study per round in that
database, deleted afterwards. Counted afterwards, per study: the slots held by more than one counted trial
(``duplicates``, must be 0), the counted trials (must be exactly ``--slots``), the complete trials whose parameter is
not the one their slot's seeded sampler proposes, and the trials failed as surplus.

    python benchmarks/slot_stress.py                                   # SQLite, 20 rounds of 4 slots
    python benchmarks/slot_stress.py --postgres postgresql://postgres@127.0.0.1:5432/db --rounds 20

Prints one table row per backend; exits 1 if any study holds a slot twice or not exactly ``--slots`` counted trials.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _seeded_x(slot: int) -> float:
    """The parameter a fresh RandomSampler seeded by ``slot`` proposes: what the slot's trial must have used."""
    import optuna
    return optuna.samplers.RandomSampler(seed=slot).sample_independent(
        None, None, "x", optuna.distributions.FloatDistribution(0.0, 1.0))


def _worker(jobs, results) -> None:
    import optuna
    from xml_plugin.protocol import slots

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    while (job := jobs.get()) is not None:
        url, name, n, start_at = job
        time.sleep(max(0.0, start_at - time.time()))  # both workers begin at the same instant
        try:
            study = optuna.create_study(study_name=name, storage=slots.make_storage(url), load_if_exists=True,
                                        sampler=optuna.samplers.RandomSampler(seed=0))

            def work(trial, slot):
                study.sampler = optuna.samplers.RandomSampler(seed=slot)  # seeded per slot, as the search does
                x = trial.suggest_float("x", 0.0, 1.0)
                time.sleep(0.005)
                return x
            slots.run_slots(study, n, work, poll_seconds=0.05)
            results.put((os.getpid(), "ok"))
        except Exception as exc:  # reported, the round counts as failed
            results.put((os.getpid(), f"{type(exc).__name__}: {exc}"[:300]))


def count(url: str, name: str, n: int) -> Dict[str, int]:
    """Duplicates, counted, complete, wrong-parameter and surplus trials of one finished study."""
    import optuna
    from xml_plugin.protocol import slots

    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    held = Counter(t.user_attrs[slots.SLOT] for t in trials if slots.counted(t) and slots.SLOT in t.user_attrs)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {"duplicates": sum(c - 1 for c in held.values() if c > 1),
            "counted": sum(slots.counted(t) for t in trials),
            "complete": len(complete),
            "wrong_params": sum(t.params["x"] != _seeded_x(t.user_attrs[slots.SLOT]) for t in complete),
            "surplus": sum(t.user_attrs.get(slots.REASON) == slots.SURPLUS for t in trials)}


def stress(backend: str, base_url: str, rounds: int, n: int, jobs: List, results, folder: Path) -> Dict[str, object]:
    import optuna

    rows, seconds, errors = [], [], []
    for r in range(rounds):
        url = f"sqlite:///{folder / f'round{r}.db'}" if backend == "sqlite" else base_url
        name = f"stress-{uuid.uuid4().hex[:8]}"
        t0 = time.time()
        start_at = t0 + 0.5
        for q in jobs:
            q.put((url, name, n, start_at))
        outcome = [results.get(timeout=300)[1] for _ in jobs]
        seconds.append(time.time() - start_at)
        errors += [o for o in outcome if o != "ok"]
        rows.append(count(url, name, n))
        if backend == "postgresql":
            optuna.delete_study(study_name=name, storage=url)
    bad = [i for i, row in enumerate(rows) if row["duplicates"] or row["counted"] != n or row["complete"] != n]
    return {"backend": backend, "rounds": rounds, "slots": n,
            "duplicates": sum(row["duplicates"] for row in rows), "bad_studies": len(bad),
            "wrong_params": sum(row["wrong_params"] for row in rows),
            "surplus": sum(row["surplus"] for row in rows),
            "median_s": statistics.median(seconds), "errors": errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--postgres", default=os.environ.get("XML_PLUGIN_TEST_POSTGRES_URL"),
                    help="a PostgreSQL URL (default: $XML_PLUGIN_TEST_POSTGRES_URL); without one, SQLite only")
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    jobs, results = [ctx.Queue() for _ in range(2)], ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(q, results), daemon=True) for q in jobs]
    for w in workers:
        w.start()
    summaries = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            backends = [("sqlite", "")] + ([("postgresql", args.postgres)] if args.postgres else [])
            for backend, url in backends:
                summaries.append(stress(backend, url, args.rounds, args.slots, jobs, results, Path(tmp)))
    finally:
        for q in jobs:
            q.put(None)
        for w in workers:
            w.join(timeout=30)
    print("| backend | rounds x slots | duplicate slots | studies without exactly n counted trials "
          "| complete trials off their slot's seeded proposal | surplus trials | median s per round | worker errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for s in summaries:
        print(f"| {s['backend']} | {s['rounds']} x {s['slots']} | {s['duplicates']} | {s['bad_studies']} "
              f"| {s['wrong_params']} | {s['surplus']} | {s['median_s']:.2f} | {len(s['errors'])} |")
        for e in s["errors"]:
            print(f"  {s['backend']} worker error: {e}", file=sys.stderr)
    return 1 if any(s["duplicates"] or s["bad_studies"] or s["errors"] for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
