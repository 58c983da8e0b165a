"""general.workers: forked single-threaded fold workers give the same report as training in the main process, a worker
killed with -9 is replaced and its unit rerun, and the worker count resolves as documented."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import as_cli_args, run_main, tiny_overrides
from xml_plugin.protocol import workers as W


class _Fake:
    """What FoldPool needs of an experiment: ``_train`` (here: a value from the unit; kills its own worker the first
    time it sees the unit named ``die``, marked by a file so that the rerun succeeds)."""

    def __init__(self, marker: Path):
        self.marker, self.bar, self.ctx = marker, None, None

    def _train(self, method, ccfg, fold, seed, desc):
        if desc == "die" and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        import torch
        return {"value": fold * 10 + seed, "threads": torch.get_num_threads(), "pid": os.getpid()}


def test_a_killed_worker_is_replaced_and_its_unit_rerun(tmp_path):
    pool = W.FoldPool(_Fake(tmp_path / "died"), 2)
    try:
        units = [("m", {}, f, 1, "die" if f == 2 else f"fold {f}") for f in range(5)]
        results = pool.run(units)
    finally:
        pool.close()
    assert [r["value"] for r in results] == [f * 10 + 1 for f in range(5)]
    assert (tmp_path / "died").exists() and pool.restarts == 1
    assert {r["threads"] for r in results} == {1}  # one torch thread per worker
    assert os.getpid() not in {r["pid"] for r in results}


def test_resolve_workers():
    assert W.resolve_workers(1, "cpu") == 1
    assert W.resolve_workers(3, "cpu") == 3
    assert W.resolve_workers("auto", "cpu") == len(os.sched_getaffinity(0))
    assert W.resolve_workers("auto", "cuda") == 1 and W.resolve_workers(4, "cpu", world_size=2) == 1


def test_one_and_two_workers_write_the_same_report(tmp_path, capsys):
    """The folds are independent units: at one torch thread each, the report, the reproductions and every trial's
    parameters are identical whether one process trains them or two workers do."""
    reports = {}
    for n in (1, 2):
        folder = tmp_path / f"w{n}"
        args = as_cli_args(tiny_overrides(folder, **{"general.workers": n, "general.num_threads": 1}))
        code, out, err = run_main(capsys, ["--experiment_name", "same", "--no_progress", *args])
        assert code == 0, err[-2000:]
        exp = folder / "experiments" / "same"
        reports[n] = ((exp / "report.csv").read_text(), (exp / "reproductions.csv").read_text())
    assert reports[1] == reports[2]
