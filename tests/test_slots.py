"""Slots on Optuna's public API: exact budgets, heartbeats, re-queued trials of dead or interrupted workers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
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


def _two_workers(tmp_path):
    """Two handles on one SQLite study, each with its own storage and connections, as two worker processes have."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    first = optuna.create_study(study_name="r", storage=slots.make_storage(url, heartbeat_interval=60))
    return first, optuna.load_study(study_name="r", storage=slots.make_storage(url, heartbeat_interval=60))


def test_a_claim_that_writes_its_slot_late_does_not_share_it(tmp_path):
    """The race of a check-then-write claim: trial a reads the free slots, b (another worker) claims slot 0 the whole
    way, then a writes slot 0. A claim that yields only to smaller trial numbers keeps both (a is the smaller)."""
    study_a, study_b = _two_workers(tmp_path)
    a, b = study_a.ask(), study_b.ask()
    assert a.number < b.number
    got = {}
    write = a.set_user_attr

    def late_write(key, value):
        if key == slots.SLOT and "b" not in got:
            got["b"] = slots.claim(study_b, b, 1)  # b's worker runs between a's read and a's write
        write(key, value)
    a.set_user_attr = late_write
    got["a"] = slots.claim(study_a, a, 1)
    assert got == {"b": 0, "a": None}
    holders = [t.number for t in study_a.get_trials() if slots.counted(t) and slots.SLOT in t.user_attrs]
    assert holders == [b.number]


@pytest.mark.parametrize("later_claims_first", [True, False])
def test_two_workers_queueing_the_same_free_slot_make_one_holder(tmp_path, later_claims_first):
    study_a, study_b = _two_workers(tmp_path)
    seen = study_a.get_trials()  # both workers found slot 0 free before either queued it
    assert slots.queue_free_slots(study_a, 1, seen) == [0] and slots.queue_free_slots(study_b, 1, seen) == [0]
    a, b = study_a.ask(), study_b.ask()  # each pops one copy
    assert a.user_attrs[slots.SLOT] == b.user_attrs[slots.SLOT] == 0 and a.number < b.number
    order = [(study_b, b), (study_a, a)] if later_claims_first else [(study_a, a), (study_b, b)]
    assert {t.number: slots.claim(s, t, 1) for s, t in order} == {a.number: 0, b.number: None}
    assert study_a.trials[b.number].user_attrs[slots.REASON] == slots.SURPLUS


def test_duplicate_queued_slots_run_once_and_none_is_left_waiting(tmp_path):
    _, study = _study(tmp_path, heartbeat_interval=60)
    for _ in range(2):  # as two workers starting together would queue them
        slots.queue_free_slots(study, 2, [])
    calls = []
    slots.run_slots(study, 2, lambda trial, slot: calls.append(slot) or 0.0, poll_seconds=0.1)
    assert sorted(calls) == [0, 1]
    states = sorted((t.user_attrs[slots.SLOT], t.state.name, t.user_attrs.get(slots.REASON)) for t in study.trials)
    assert states == [(0, "COMPLETE", None), (0, "FAIL", slots.SURPLUS), (1, "COMPLETE", None), (1, "FAIL", slots.SURPLUS)]


_POP = """
import sys, time, optuna
from pathlib import Path
from xml_plugin.protocol import slots
optuna.logging.set_verbosity(optuna.logging.ERROR)
study = optuna.load_study(study_name=sys.argv[4], storage=slots.make_storage(sys.argv[1], heartbeat_interval=60))
Path(sys.argv[2] + sys.argv[3]).touch()
while not all(Path(sys.argv[2] + w).exists() for w in ("0", "1")):  # both workers start popping together
    time.sleep(0.001)
got = []
while slots.SLOT in (trial := study.ask()).user_attrs:
    got.append(trial.number)
study.tell(trial, state=optuna.trial.TrialState.FAIL)  # the queue is empty: a fresh trial, given up
print(" ".join(map(str, got)))
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_queued_trial_is_handed_to_one_worker_only(tmp_path, backend):
    # without BEGIN IMMEDIATE, sqlite3 reads a WAITING trial outside any transaction: both workers can pop it
    if backend == "postgresql":
        url = os.environ.get("XML_PLUGIN_TEST_POSTGRES_URL")
        if not url:
            pytest.skip("set XML_PLUGIN_TEST_POSTGRES_URL (bash .ci/run starts a PostgreSQL server and sets it)")
    else:
        url = f"sqlite:///{tmp_path / 'q.db'}"
    name = f"q{uuid.uuid4().hex[:8]}"  # a fresh study in a shared database
    study = optuna.create_study(study_name=name, storage=slots.make_storage(url, heartbeat_interval=60))
    n = 60
    for s in range(n):
        study.enqueue_trial({}, user_attrs={slots.SLOT: s})
    procs = [subprocess.Popen([sys.executable, "-c", _POP, url, str(tmp_path / "ready"), str(w), name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-500:] for _, err in outs]
    popped = [int(x) for out, _ in outs for x in out.split()]
    assert sorted(popped) == list(range(n))  # every queued trial popped, none twice
