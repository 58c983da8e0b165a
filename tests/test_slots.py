"""Slots on Optuna's public API: exact budgets, heartbeats, re-queued trials of dead or interrupted workers."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from xml_plugin.protocol import slots

optuna.logging.set_verbosity(optuna.logging.ERROR)


def _study(tmp_path, db="s.db", **kw):
    storage = slots.make_storage(f"sqlite:///{tmp_path / db}", **kw)
    return storage, optuna.create_study(study_name="s", storage=storage,
                                        sampler=optuna.samplers.RandomSampler(seed=0))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _held_by_dead_worker(study, slot):
    """A RUNNING trial with a parameter and a slot, whose worker process on this host no longer exists."""
    t = study.ask()
    x = t.suggest_float("x", 0.0, 1.0)
    t.set_user_attr(slots.SLOT, slot)
    t.set_user_attr("worker", f"{socket.gethostname()}:{_dead_pid()}")
    return t, x


def test_every_slot_runs_once_without_optuna_warnings(tmp_path):
    calls = []

    def work(trial, slot):
        calls.append(slot)
        return trial.suggest_float("x", 0.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated, experimental or "heartbeat with ask" notice leaks out
        _, study = _study(tmp_path, heartbeat_interval=1)
        slots.run_slots(study, 3, work, poll_seconds=0.1)
    assert sorted(calls) == [0, 1, 2]
    done = slots.finished_trials(study)
    assert [t.user_attrs[slots.SLOT] for t in done] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE and t.value == t.params["x"] for t in done)
    slots.run_slots(study, 3, work, poll_seconds=0.1)  # a finished budget runs nothing
    assert len(calls) == 3


def test_heartbeat_is_recorded_while_work_runs(tmp_path):
    storage, study = _study(tmp_path, heartbeat_interval=1, grace_period=1)

    def work(trial, slot):
        time.sleep(2.5)  # longer than the grace period: without heartbeats another worker would fail this trial
        optuna.storages.fail_stale_trials(study)
        assert study.trials[trial.number].state == TrialState.RUNNING
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        slots.run_slots(study, 1, work, poll_seconds=0.1)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]


def test_stale_remote_trial_is_failed_by_heartbeat_and_retried_with_its_slot_and_params(tmp_path):
    storage, study = _study(tmp_path, heartbeat_interval=1, grace_period=1)
    t = study.ask()
    x = t.suggest_float("x", 0.0, 1.0)
    t.set_user_attr(slots.SLOT, 0)
    t.set_user_attr("worker", "another-host:1")  # not checkable from here: only its stopped heartbeat tells
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name("s"), t.number))
    time.sleep(2.2)
    seen = []
    slots.run_slots(study, 2, lambda trial, slot: seen.append((slot, trial.params.get("x"))) or 0.0, poll_seconds=0.1)
    assert study.trials[t.number].state == TrialState.FAIL
    assert (0, x) in seen and sorted(s for s, _ in seen) == [0, 1]
    assert [u.user_attrs[slots.SLOT] for u in slots.finished_trials(study)] == [0, 1]


def test_dead_local_worker_is_retried_at_once(tmp_path):
    _, study = _study(tmp_path, heartbeat_interval=60)  # a grace period of 3 minutes is not waited for
    t, x = _held_by_dead_worker(study, 1)
    seen = []
    start = time.monotonic()
    slots.run_slots(study, 2, lambda trial, slot: seen.append((slot, trial.params.get("x"))) or 0.0, poll_seconds=0.1)
    assert time.monotonic() - start < 30
    assert study.trials[t.number].state == TrialState.FAIL
    assert sorted(s for s, _ in seen) == [0, 1] and (1, x) in seen
    retry = next(u for u in study.trials if u.number > t.number and u.user_attrs.get(slots.SLOT) == 1)
    assert retry.state == TrialState.COMPLETE and retry.params == {"x": x}


def test_dead_worker_is_retried_at_most_max_retry_times(tmp_path):
    _, study = _study(tmp_path, heartbeat_interval=60)
    t, _ = _held_by_dead_worker(study, 0)
    for _ in range(slots.MAX_RETRY + 1):
        slots.fail_dead_local_trials(study)
        waiting = study.get_trials(states=(TrialState.WAITING,))
        if not waiting:
            break
        again = study.ask()  # pops the re-queued copy; its worker dies too
        again.set_user_attr("worker", f"{socket.gethostname()}:{_dead_pid()}")
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == slots.MAX_RETRY + 1 and not study.get_trials(states=(TrialState.WAITING,))
    assert {u.user_attrs[slots.SLOT] for u in failed} == {0}


def test_interrupted_trial_is_requeued_with_its_slot_and_params(tmp_path):
    _, study = _study(tmp_path, heartbeat_interval=60)

    def interrupted(trial, slot):
        trial.suggest_float("x", 0.0, 1.0)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        slots.run_slots(study, 1, interrupted, poll_seconds=0.1)
    first = study.trials[0]
    assert first.state == TrialState.FAIL
    [waiting] = study.get_trials(states=(TrialState.WAITING,))
    assert waiting.user_attrs[slots.SLOT] == 0 and waiting.params == first.params
    seen = []
    slots.run_slots(study, 1, lambda trial, slot: seen.append((slot, trial.suggest_float("x", 0.0, 1.0))) or 0.0,
                    poll_seconds=0.1)
    assert seen == [(0, first.params["x"])]


def test_failures_with_a_reason_keep_their_slot_and_others_propagate(tmp_path):
    _, study = _study(tmp_path, heartbeat_interval=60)

    class Exploded(RuntimeError):
        fail_reason = "nonfinite: loss is nan"

    def work(trial, slot):
        if slot == 0:
            raise Exploded("nan")
        return 0.5
    slots.run_slots(study, 2, work, poll_seconds=0.1)
    done = slots.finished_trials(study)
    assert [(t.user_attrs[slots.SLOT], t.state) for t in done] == [(0, TrialState.FAIL), (1, TrialState.COMPLETE)]
    assert done[0].user_attrs[slots.REASON] == "nonfinite: loss is nan"

    _, other = _study(tmp_path, "other.db", heartbeat_interval=60)
    with pytest.raises(ZeroDivisionError):
        slots.run_slots(other, 2, lambda trial, slot: 1 / 0, poll_seconds=0.1)
    [t] = other.trials
    assert t.state == TrialState.FAIL and t.user_attrs[slots.REASON].startswith("error: ZeroDivisionError")
    assert not slots.finished_trials(other)  # a bug frees the slot
