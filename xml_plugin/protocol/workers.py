"""Single-threaded worker processes that train an experiment's folds in parallel (``general.workers``).

The folds of one search trial and the folds of every reproduction are independent units of work: each trains from its
own seed on its own split, reads the same cached views and writes only its own run folder. Running them in parallel
therefore gives the numbers a sequential run with the same thread count gives, and the search's proposals (made in the
main process after all folds of a trial are in) do not depend on the number of workers.

The workers are forked from the main process once its set-up is done, so they share its data set, trunk and feature
cache (copy-on-write) and every component registered by the user's modules. Each runs one torch (and faiss) thread,
ignores Ctrl-C (the main process stops them) and dies with the main process (``PR_SET_PDEATHSIG``). A worker that dies
(``kill -9``) is replaced and its fold resumes from the fold's last epoch checkpoint.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

Unit = Tuple[str, Dict[str, Any], int, int, str]  # method, resolved config, fold, seed, description
MAX_RESTARTS = 3
_STATE: Dict[str, Any] = {}  # in a worker: the experiment it trains for (inherited by fork)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_workers(value: Any, device_type: str, world_size: int = 1) -> int:
    """``general.workers`` -> a number of worker processes: ``auto`` is the usable cores on CPU and 1 on CUDA or under
    ``torchrun`` (one process per GPU there); 1 trains in the main process (no workers)."""
    if world_size > 1 or device_type != "cpu":
        return 1
    if value in (None, "auto"):
        return usable_cores()
    return int(value)


def _die_with_parent() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: an orphaned worker ends when its fold does
        pass


def _init_worker(threads: int) -> None:
    import torch
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops the workers
    _die_with_parent()
    torch.set_num_threads(threads)
    try:
        import faiss
        faiss.omp_set_num_threads(threads)
    except ImportError:  # pragma: no cover - faiss is a dependency
        pass
    exp = _STATE.get("experiment")
    if exp is not None:
        exp.bar = None  # the main process keeps the experiment's progress bar
        if exp.ctx is not None:
            exp.ctx.progress = False


def _train_unit(unit: Unit) -> Dict[str, Any]:
    method, ccfg, fold, seed, desc = unit
    return _STATE["experiment"]._train(method, ccfg, fold, seed, desc=desc)


def _noop() -> int:
    return os.getpid()


class FoldPool:
    """``n`` forked single-threaded workers training units of ``experiment`` (an object with ``_train``)."""

    def __init__(self, experiment: Any, n: int, threads: int = 1):
        if "fork" not in multiprocessing.get_all_start_methods():
            raise RuntimeError("worker processes need the fork start method (Linux); use --general.workers 1")
        self.experiment, self.n, self.threads = experiment, int(n), int(threads)
        self.restarts = 0
        self._pool: Optional[cf.ProcessPoolExecutor] = None
        self._start()

    def _start(self) -> None:
        _STATE["experiment"] = self.experiment  # inherited by the forked workers
        self._pool = cf.ProcessPoolExecutor(max_workers=self.n, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_init_worker, initargs=(self.threads,))
        # the first submission forks every worker: now, before the main process starts heartbeat threads
        self._pool.submit(_noop).result()

    def run(self, units: Sequence[Unit], on_done: Optional[Callable[[int, Dict[str, Any]], None]] = None
            ) -> List[Dict[str, Any]]:
        """Train ``units`` on the workers; their results in order. ``on_done(i, result)`` as each finishes. An error
        in a unit is raised as it is (after the running units finish); a dead worker is replaced and the units that had
        not finished are run again (each fold resumes from its last checkpoint)."""
        pending = dict(enumerate(units))
        results: Dict[int, Dict[str, Any]] = {}
        while pending:
            futures = {self._pool.submit(_train_unit, u): i for i, u in pending.items()}
            try:
                for fut in cf.as_completed(futures):
                    i = futures[fut]
                    results[i] = fut.result()
                    pending.pop(i)
                    if on_done is not None:
                        on_done(i, results[i])
            except BrokenProcessPool:
                self.restarts += 1
                if self.restarts > MAX_RESTARTS:
                    raise RuntimeError(f"worker processes died {self.restarts} times; rerun the same command to "
                                       f"resume, or use --general.workers 1") from None
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._start()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
        return [results[i] for i in range(len(units))]

    def close(self, kill: bool = False) -> None:
        """Stop the workers: at once (``kill``, e.g. on Ctrl-C: the folds resume from their checkpoints) or after
        their current units."""
        if self._pool is None:
            return
        procs = list(getattr(self._pool, "_processes", {}).values())
        if kill:
            for p in procs:
                if p.is_alive():
                    p.kill()
        self._pool.shutdown(wait=not kill, cancel_futures=True)
        self._pool = None
        _STATE.pop("experiment", None)
