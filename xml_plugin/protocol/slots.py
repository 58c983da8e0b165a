"""Exact trial budgets for one or many workers sharing an Optuna storage.

Each unit of work (a search trial, a reproduction) holds a *slot* 0..n-1 recorded as the trial's user attribute
``slot``. A worker runs one trial at a time with ``Study.optimize`` (so Optuna records its heartbeat); the trial
claims the smallest free slot, then checks again: when a trial with a smaller number holds the same slot, or no slot
is free, the trial is failed as ``surplus`` and the worker waits. The trial of a worker that died is failed (by
Optuna's heartbeat, or at once when the dead process was on this host) and re-queued by
``RetryHeartbeatStaleTrialCallback`` with its slot and parameters, so every slot is done exactly once.
"""
from __future__ import annotations

import os
import random
import socket
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

SLOT, REASON = "slot", "fail_reason"
SURPLUS, NONFINITE = "surplus", "nonfinite"
MAX_RETRY = 3  # times the trial of a dead worker is re-queued


class _Surplus(Exception):
    """The trial found no free slot (recorded as ``fail_reason: surplus``)."""


class _Recorded(Exception):
    """``work`` failed with a ``fail_reason`` (recorded on the trial): the trial fails, the worker goes on."""


def _retry_callback(max_retry: int = MAX_RETRY) -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():  # experimental in Optuna 5; it is the supported retry mechanism
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def make_storage(url: str, heartbeat_interval: int = 5, grace_period: Optional[int] = None,
                 max_retry: int = MAX_RETRY) -> optuna.storages.RDBStorage:
    """An RDB storage (SQLite file, PostgreSQL ...) with heartbeats, so a killed worker's trial is failed and retried."""
    kwargs: Dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    for attempt in range(8):
        try:
            with warnings.catch_warnings():  # heartbeat_interval is an experimental argument in Optuna 5
                warnings.simplefilter("ignore", ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat_interval, grace_period=grace_period or 3 * heartbeat_interval,
                    heartbeat_stale_trial_callback=_retry_callback(max_retry), **kwargs)
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


def _requeue(study: optuna.Study, number: int) -> None:
    """Queue a copy of trial ``number`` (slot, parameters, retry history) as WAITING, as the heartbeat retry does."""
    frozen = next(t for t in study.get_trials(deepcopy=True) if t.number == number)
    _retry_callback()(study, frozen)


def fail_dead_local_trials(study: optuna.Study) -> None:
    """Fail and re-queue RUNNING trials of processes on this host that no longer exist, without waiting for the grace
    period; then let Optuna fail (and re-queue) the trials whose heartbeat is stale."""
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        if worker.rpartition(":")[0] != host:
            continue
        try:
            os.kill(int(worker.rpartition(":")[2]), 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker failed it first, and re-queued it
        _requeue(study, t.number)
    with warnings.catch_warnings():  # experimental in Optuna 5; what Study.optimize itself calls before each trial
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _claim(study: optuna.Study, trial: optuna.Trial, n_slots: int) -> Optional[int]:
    """The slot this trial works on, or None (then its ``fail_reason`` is ``surplus``; the caller fails it)."""
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
        return None
    return mine


def claim(study: optuna.Study, trial: optuna.Trial, n_slots: int) -> Optional[int]:
    """The slot this trial works on, or None (the trial is surplus and has been marked failed)."""
    slot = _claim(study, trial, n_slots)
    if slot is None:
        study.tell(trial, state=TrialState.FAIL)
    return slot


def run_slots(study: optuna.Study, n_slots: int, work: Callable[[optuna.Trial, int], float],
              poll_seconds: float = 2.0, on_wait: Optional[Callable[[], None]] = None) -> None:
    """Run ``work(trial, slot)`` until every slot has a finished trial (this worker's or another's).

    ``work`` returns the objective value, raises ``optuna.TrialPruned`` to prune, or raises an exception whose
    ``fail_reason`` attribute (e.g. ``"nonfinite: ..."``) is recorded when the trial fails; any other exception propagates
    after the trial is marked failed. An interrupted trial (``KeyboardInterrupt``) is failed and re-queued.
    """
    surplus: List[int] = []

    def objective(trial: optuna.Trial) -> float:
        slot = _claim(study, trial, n_slots)
        if slot is None:
            surplus.append(trial.number)
            raise _Surplus(f"trial {trial.number}: no free slot of {n_slots}")
        try:
            return work(trial, slot)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            _requeue(study, trial.number)  # Optuna fails it; the copy resumes the slot on the next start
            raise
        except Exception as exc:
            reason = getattr(exc, "fail_reason", None)
            trial.set_user_attr(REASON, reason or f"error: {type(exc).__name__}: {exc}"[:500])
            if reason:
                raise _Recorded(reason) from exc
            raise

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
        study.optimize(objective, n_trials=1, catch=(_Surplus, _Recorded))
        if surplus:
            surplus.clear()
            time.sleep(poll_seconds * 0.5)


def finished_trials(study: optuna.Study) -> List[optuna.trial.FrozenTrial]:
    """One finished (complete or pruned) trial per slot, the latest for each slot."""
    by_slot: Dict[int, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        if counted(t) and t.state not in (TrialState.RUNNING, TrialState.WAITING) and SLOT in t.user_attrs:
            by_slot[t.user_attrs[SLOT]] = t
    return [by_slot[s] for s in sorted(by_slot)]
