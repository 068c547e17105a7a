"""Work shared through an Optuna study by real processes on one sqlite storage: each item evaluated
once, no worker failing another's trial, and a SIGKILLed worker's item retried once by one
worker."""

import json
import os
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from mstl.tracking.work import heartbeat_storage
from tests.conftest import REPO
from tests.workers.shared_items import ITEMS


def start_worker(storage, study, out, *extra, together=0, module="shared_items"):
    """A worker process; with ``together``, it waits until that many workers are ready, so they
    race."""
    return subprocess.Popen(
        [sys.executable, "-m", f"tests.workers.{module}", storage, study, str(out), *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, BARRIER_WORKERS=str(together)),
    )


def trials_of(storage, study):
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


@pytest.mark.integration  # several processes: run with the integration tests
def test_two_workers_evaluate_each_item_exactly_once_and_fail_nothing(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="shared", storage=storage)  # both workers then load it at once
    workers = [
        start_worker(storage, "shared", tmp_path / f"w{i}.json", together=2) for i in range(2)
    ]
    for w in workers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(2)]
    evaluated = results[0]["evaluated"] + results[1]["evaluated"]
    assert sorted(evaluated) == ITEMS  # every item once, across both workers
    assert all(r["evaluated"] for r in results)  # and both did work: they really ran side by side
    assert (
        results[0]["done"] == results[1]["done"] == ITEMS
    )  # each returned with the whole set complete
    trials = trials_of(storage, "shared")
    assert not [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.params["item"] for t in trials if t.state == TrialState.COMPLETE) == ITEMS


@pytest.mark.integration  # several processes: run with the integration tests
def test_a_killed_workers_item_is_retried_once_by_one_worker(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="kill", storage=storage)
    # the victim's heartbeat thread never beats: only run_shared's own first beat makes its trial
    # stale
    victim = start_worker(
        storage, "kill", tmp_path / "victim.json", "--die-on", "b", "--no-heartbeat-thread"
    )
    victim.communicate(timeout=120)
    assert victim.returncode == -9
    left = [t for t in trials_of(storage, "kill") if t.state == TrialState.RUNNING]
    assert [t.params["item"] for t in left] == ["b"]  # SIGKILL left its trial running
    survivors = [start_worker(storage, "kill", tmp_path / f"s{i}.json") for i in range(2)]
    for w in survivors:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err[-3000:]
    evaluated = [
        item
        for i in range(2)
        for item in json.loads((tmp_path / f"s{i}.json").read_text())["evaluated"]
    ]
    assert evaluated.count("b") == 1 and sorted(evaluated) == sorted(set(ITEMS) - {"a"})
    trials = trials_of(storage, "kill")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.params["item"] for t in failed] == [
        "b"
    ]  # the dead trial, failed once by one survivor
    assert [t.params["item"] for t in trials if t.state == TrialState.COMPLETE].count("b") == 1
    # Optuna's stale-trial callback queued the retry (a worker may also have queued one: only one
    # ran)
    assert len([t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]) == 1


@pytest.mark.integration  # several processes: run with the integration tests
def test_two_workers_popping_one_sqlite_queue_never_run_the_same_trial(tmp_path):
    """Optuna's pop (read WAITING, write RUNNING) is atomic on SQLite only with the write lock taken
    at BEGIN: without it two workers ran the same trial in 9 of 100 pops here, and CI saw "Cannot
    tell a COMPLETE trial"."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="queue", storage=storage)
    for i in range(100):
        study.enqueue_trial({"i": i})
    workers = [
        start_worker(storage, "queue", tmp_path / f"w{i}.json", together=2, module="pop_queue")
        for i in range(2)
    ]
    for w in workers:
        _, err = w.communicate(timeout=180)
        assert w.returncode == 0, err[-3000:]
    ran = [json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(2)]
    assert sorted(ran[0] + ran[1]) == list(range(100))  # each queued trial run once, by one worker
    assert all(ran)  # both took a share


def test_heartbeat_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="heartbeat_seconds"):
        heartbeat_storage(f"sqlite:///{tmp_path / 'x.db'}", 0)


def test_a_worker_taken_for_dead_discards_its_result_and_the_item_runs_again(tmp_path):
    """A live worker whose trial another worker failed as stale (late heartbeat) warns and goes
    on."""
    from mstl.tracking.work import run_shared

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="late", storage=heartbeat_storage(url, 5))
    other = optuna.storages.RDBStorage(url)  # another worker's view of the same database
    calls = []

    def evaluate(trial, item):
        calls.append(item)
        if len(calls) == 1:  # as another worker's fail_stale_trials would, while we still compute
            trial_id = other.get_trial_id_from_study_id_trial_number(
                other.get_study_id_from_name("late"), trial.number
            )
            other.set_trial_state_values(trial_id, TrialState.FAIL)
        return 1.0

    with pytest.warns(RuntimeWarning, match="judged this one dead"):
        done = run_shared(study, "item", ["x"], evaluate, poll_seconds=0.1)
    assert calls == ["x", "x"] and done["x"].state == TrialState.COMPLETE
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_trial_beats_before_its_work_starts(tmp_path, monkeypatch):
    """With Optuna's heartbeat thread silent (a worker killed before its first beat), the trial the
    work runs in already has a beat, so it goes stale and another worker can fail and retry it."""
    from optuna.storages._heartbeat import HeartbeatThread

    from mstl.tracking.work import frozen_by_number, run_shared

    monkeypatch.setattr(HeartbeatThread, "start", lambda self: None)
    monkeypatch.setattr(HeartbeatThread, "join", lambda self: None)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="beat", storage=heartbeat_storage(url, 1))
    other = optuna.load_study(study_name="beat", storage=heartbeat_storage(url, 1))
    seen = []

    def evaluate(trial, item):
        if not seen:  # as another worker would, once our beat is older than the grace period (2 s)
            time.sleep(3.2)  # sqlite's clock counts whole seconds
            optuna.storages.fail_stale_trials(other)
            seen.append(frozen_by_number(other, trial.number).state)
        return 1.0

    with pytest.warns(RuntimeWarning, match="judged this one dead"):
        done = run_shared(study, "item", ["x"], evaluate, poll_seconds=0.1)
    assert seen == [TrialState.FAIL]  # a trial without a beat is never stale: it would be RUNNING
    assert done["x"].state == TrialState.COMPLETE
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]


@pytest.mark.filterwarnings(
    "ignore:Heartbeat of storage is supposed to be used with Study.optimize"
)
def test_a_trial_whose_first_beat_cannot_be_recorded_fails_at_once(tmp_path, monkeypatch):
    """Not left RUNNING without a beat, which no worker would ever judge stale."""
    storage = heartbeat_storage(f"sqlite:///{tmp_path / 'optuna.db'}", 1)
    study = optuna.create_study(study_name="nobeat", storage=storage)
    study.enqueue_trial({"item": "x"})

    def broken(trial_id):
        raise RuntimeError("database gone")

    monkeypatch.setattr(storage, "record_heartbeat", broken)
    with pytest.raises(RuntimeError, match="database gone"):
        study.ask()
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]
