"""Exact trial budgets for one or many workers sharing an Optuna storage.

Each unit of work (a search trial, a reproduction) holds a *slot* 0..n-1 recorded as the trial's user attribute
``slot``. A worker asks Optuna for a trial, claims the smallest free slot, then checks again: when a trial with a
smaller number holds the same slot, or no slot is free, the new trial is marked failed as ``surplus`` and the worker
waits. Trials of a worker that died are failed by Optuna's heartbeat and retried by ``RetryFailedTrialCallback``
with their slot (user attributes are copied), so every slot is done exactly once.
"""
from __future__ import annotations

import os
import random
import socket
import threading
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import optuna
from optuna.trial import TrialState

# heartbeats with ask/tell are what this module is for; Optuna's experimental/deprecation notices about them are noise
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message=".*failed_trial_callback.*|.*RetryFailedTrialCallback.*|.*Heartbeat of storage.*")

SLOT, REASON = "slot", "fail_reason"
SURPLUS, NONFINITE = "surplus", "nonfinite"


def make_storage(url: str, heartbeat_interval: int = 5, grace_period: Optional[int] = None,
                 max_retry: int = 3) -> optuna.storages.RDBStorage:
    """An RDB storage (SQLite file, PostgreSQL ...) with heartbeats, so a killed worker's trial is failed and retried."""
    kwargs: Dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    for attempt in range(8):
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat_interval, grace_period=grace_period or 3 * heartbeat_interval,
                failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=max_retry), **kwargs)
        except Exception as exc:  # workers starting together race to create the schema of a new database
            from sqlalchemy.exc import IntegrityError, OperationalError
            if not isinstance(exc, (IntegrityError, OperationalError)) or attempt == 7:
                raise
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
    raise AssertionError("unreachable")


def counted(t: optuna.trial.FrozenTrial) -> bool:
    """A trial that holds its slot: finished, pruned, running, or failed with a non-finite loss (a real attempt)."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
        return True
    return t.state == TrialState.FAIL and t.user_attrs.get(REASON, "").startswith(NONFINITE)


def slots_done(study: optuna.Study) -> int:
    return len(finished_trials(study))


def _this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def fail_dead_local_trials(study: optuna.Study) -> None:
    """Fail (and so retry) RUNNING trials of processes on this host that no longer exist, without waiting for the grace period."""
    host = socket.gethostname()
    stale = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        if worker.rpartition(":")[0] == host:
            pid = int(worker.rpartition(":")[2])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                stale.append(t)
            except PermissionError:
                pass
    storage = study._storage
    for t in stale:
        if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
            cb = storage.get_failed_trial_callback() if hasattr(storage, "get_failed_trial_callback") else None
            if cb is not None:
                cb(study, storage.get_trial(t._trial_id))
    optuna.storages.fail_stale_trials(study)


class _Heartbeat:
    """Records the trial's heartbeat every ``interval`` seconds while the work runs (ask/tell has no built-in one)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial):
        self.storage, self.trial_id = study._storage, trial._trial_id
        self.interval = getattr(self.storage, "get_heartbeat_interval", lambda: None)()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a transient storage error must not kill the training
                pass

    def __enter__(self):
        if self.interval:
            self.storage.record_heartbeat(self.trial_id)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def claim(study: optuna.Study, trial: optuna.Trial, n_slots: int) -> Optional[int]:
    """The slot this trial works on, or None (the trial is surplus and has been marked failed)."""
    trial.set_user_attr("worker", _this_worker())
    mine = trial.user_attrs.get(SLOT)
    if mine is None:
        held = {t.user_attrs[SLOT] for t in study.get_trials(deepcopy=False)
                if t.number != trial.number and counted(t) and SLOT in t.user_attrs}
        mine = next((s for s in range(n_slots) if s not in held), None)
        if mine is not None:
            trial.set_user_attr(SLOT, mine)
    # a concurrent worker may have claimed the same slot: the smaller trial number wins
    if mine is None or mine >= n_slots or any(
            t.number < trial.number and counted(t) and t.user_attrs.get(SLOT) == mine
            for t in study.get_trials(deepcopy=False)):
        trial.set_user_attr(REASON, SURPLUS)
        study.tell(trial, state=TrialState.FAIL)
        return None
    return mine


def run_slots(study: optuna.Study, n_slots: int, work: Callable[[optuna.Trial, int], float],
              poll_seconds: float = 2.0, on_wait: Optional[Callable[[], None]] = None) -> None:
    """Run ``work(trial, slot)`` until every slot has a finished trial (this worker's or another's).

    ``work`` returns the objective value, raises ``optuna.TrialPruned`` to prune, or raises an exception whose
    ``fail_reason`` attribute (e.g. ``"nonfinite: ..."``) is recorded when the trial fails; any other exception propagates
    after the trial is marked failed.
    """
    fail_dead_local_trials(study)
    while (done := slots_done(study)) < n_slots:
        busy = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
                if SLOT in t.user_attrs or t.state == TrialState.WAITING]
        if done + len(busy) >= n_slots and not any(t.state == TrialState.WAITING for t in busy):
            if on_wait is not None:
                on_wait()
            time.sleep(poll_seconds)
            fail_dead_local_trials(study)
            continue
        trial = study.ask()
        slot = claim(study, trial, n_slots)
        if slot is None:
            time.sleep(poll_seconds * 0.5)
            continue
        with _Heartbeat(study, trial):
            try:
                value = work(trial, slot)
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED)
                continue
            except Exception as exc:
                reason = getattr(exc, "fail_reason", None)
                trial.set_user_attr(REASON, reason or f"error: {type(exc).__name__}: {exc}"[:500])
                study.tell(trial, state=TrialState.FAIL)
                if reason:
                    continue
                raise
        study.tell(trial, value)


def finished_trials(study: optuna.Study) -> List[optuna.trial.FrozenTrial]:
    """One finished (complete or pruned) trial per slot, the latest for each slot."""
    by_slot: Dict[int, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        if counted(t) and t.state not in (TrialState.RUNNING, TrialState.WAITING) and SLOT in t.user_attrs:
            by_slot[t.user_attrs[SLOT]] = t
    return [by_slot[s] for s in sorted(by_slot)]
