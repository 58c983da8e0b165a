"""Exact trial budgets for one or many workers sharing an Optuna storage.

Each unit of work (a search trial, a reproduction) holds a *slot* 0..n-1 recorded as the trial's user attribute
``slot``. The storage hands out the slots: a worker that finds no trial waiting queues the smallest slot that no
trial holds as a WAITING trial that carries its slot from the moment it exists (``Study.enqueue_trial``), and Optuna
moves a WAITING trial to RUNNING for exactly one worker (a row lock on PostgreSQL; on SQLite every transaction of ``make_storage``'s engine is ``BEGIN IMMEDIATE``,
without which the driver reads outside transactions and two workers can pop the same trial). Two workers that queue
the same free slot at the same moment make two copies of it: the copy with the smaller trial number holds the slot and
the other is failed as ``surplus`` when it is popped. That check cannot race, because the storage numbers the trials
of a study in the order it creates them (PostgreSQL locks the study row, SQLite the whole file), so the later copy
always sees the earlier one. A worker runs one trial at a time with ``Study.optimize`` (so Optuna records its
heartbeat). The trial of a worker that died is failed (by Optuna's heartbeat, or at once when the dead process was on
this host) and re-queued by ``RetryHeartbeatStaleTrialCallback`` with its slot and parameters, so every slot is done
exactly once.
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
    """The trial holds no slot of its own (recorded as ``fail_reason: surplus``)."""


class _Recorded(Exception):
    """``work`` failed with a ``fail_reason`` (recorded on the trial): the trial fails, the worker goes on."""


def _retry_callback(max_retry: int = MAX_RETRY) -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():  # experimental in Optuna 5; it is the supported retry mechanism
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def _serialize_sqlite(engine) -> None:
    """Start every transaction of this SQLite engine with ``BEGIN IMMEDIATE`` (the write lock, waited for).

    Python's sqlite3 driver (legacy transaction control, the default up to Python 3.15) sends SELECTs outside any
    transaction, so Optuna's read-then-write of a trial's state (WAITING -> RUNNING, RUNNING -> FAIL) is not atomic
    across processes; with the lock taken at BEGIN each storage call is.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _driver_leaves_transactions_alone(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections pooled before the listeners existed are not reused


def make_storage(url: str, heartbeat_interval: int = 5, grace_period: Optional[int] = None,
                 max_retry: int = MAX_RETRY) -> optuna.storages.RDBStorage:
    """An RDB storage (SQLite file, PostgreSQL ...) with heartbeats, so a killed worker's trial is failed and retried;
    on SQLite its transactions are serialized (see ``_serialize_sqlite``)."""
    kwargs: Dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    for attempt in range(8):
        try:
            with warnings.catch_warnings():  # heartbeat_interval is an experimental argument in Optuna 5
                warnings.simplefilter("ignore", ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat_interval, grace_period=grace_period or 3 * heartbeat_interval,
                    heartbeat_stale_trial_callback=_retry_callback(max_retry), **kwargs)
        except Exception as exc:  # workers starting together race to create the schema of a new database
            from sqlalchemy.exc import IntegrityError, OperationalError
            if not isinstance(exc, (IntegrityError, OperationalError)) or attempt == 7:
                raise
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
            continue
        if storage.engine.dialect.name == "sqlite" and storage.engine.url.database not in (None, "", ":memory:"):
            _serialize_sqlite(storage.engine)
        return storage
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


def _held(trials: List[optuna.trial.FrozenTrial], but: int = -1) -> Dict[int, List[int]]:
    """slot -> numbers of the counted trials holding it, trial ``but`` left out."""
    held: Dict[int, List[int]] = {}
    for t in trials:
        if t.number != but and counted(t) and SLOT in t.user_attrs:
            held.setdefault(t.user_attrs[SLOT], []).append(t.number)
    return held


def queue_free_slots(study: optuna.Study, n_slots: int, trials: Optional[List[optuna.trial.FrozenTrial]] = None,
                     most: Optional[int] = None) -> List[int]:
    """Queue a WAITING trial for each slot of ``0..n_slots-1`` that no counted trial holds (the ``most`` smallest of
    them); returns those slots."""
    held = _held(study.get_trials(deepcopy=False) if trials is None else trials)
    free = [s for s in range(n_slots) if s not in held][:most]
    for s in free:
        study.enqueue_trial({}, user_attrs={SLOT: s})
    return free


def _claim(study: optuna.Study, trial: optuna.Trial, n_slots: int) -> Optional[int]:
    """The slot this trial works on, or None (then its ``fail_reason`` is ``surplus``; the caller fails it).

    A trial that carries its slot (queued, or re-queued after its worker died) had it from its creation: it yields to
    a counted trial with a smaller number holding the same slot. A trial without one (made by ``Study.ask`` when the
    queue was empty) writes the smallest free slot and then yields to any other counted holder of that slot: of two
    claims of one slot, the one that looks last sees the other.
    """
    trial.set_user_attr("worker", _this_worker())
    mine = trial.user_attrs.get(SLOT)
    queued = mine is not None
    if not queued:
        held = _held(study.get_trials(deepcopy=False), but=trial.number)
        mine = next((s for s in range(n_slots) if s not in held), None)
        if mine is not None:
            trial.set_user_attr(SLOT, mine)
    if mine is not None and 0 <= mine < n_slots:
        rivals = _held(study.get_trials(deepcopy=False), but=trial.number).get(mine, [])
        if not any(r < trial.number for r in rivals) and (queued or not rivals):
            return mine
    trial.set_user_attr(REASON, SURPLUS)
    return None


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
    after the trial is marked failed (its slot is free again). An interrupted trial (``KeyboardInterrupt``) is failed
    and re-queued. ``work`` suggests its parameters itself (the queued trials carry none), so the sampler that
    ``work`` installs decides them, as for a trial made by ``Study.ask``.
    """

    def objective(trial: optuna.Trial) -> float:
        slot = _claim(study, trial, n_slots)
        if slot is None:
            raise _Surplus(f"trial {trial.number}: no slot of {n_slots} is its own")
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
    while True:
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if len(_finished(trials)) >= n_slots and not waiting:
            return  # (a copy left waiting for a finished slot is popped and failed as surplus first)
        # one slot at a time, when nothing waits: two copies of a slot only when two workers look at the same moment
        if not waiting and not queue_free_slots(study, n_slots, trials, most=1):
            if on_wait is not None:  # every open slot is running in another worker
                on_wait()
            time.sleep(poll_seconds)
            fail_dead_local_trials(study)
            continue
        study.optimize(objective, n_trials=1, catch=(_Surplus, _Recorded))


def _finished(trials: List[optuna.trial.FrozenTrial]) -> List[optuna.trial.FrozenTrial]:
    by_slot: Dict[int, optuna.trial.FrozenTrial] = {}
    for t in trials:
        if counted(t) and t.state not in (TrialState.RUNNING, TrialState.WAITING) and SLOT in t.user_attrs:
            by_slot[t.user_attrs[SLOT]] = t
    return [by_slot[s] for s in sorted(by_slot)]


def finished_trials(study: optuna.Study) -> List[optuna.trial.FrozenTrial]:
    """One finished (complete or pruned) trial per slot, the latest for each slot."""
    return _finished(study.get_trials(deepcopy=False))
