"""Work shared by several processes through an Optuna study on an RDB storage (sqlite, PostgreSQL).

Each item of work (a cluster count k of the soft-label search, a cell of the experiment grid) is an
Optuna trial with the item as its one parameter. Optuna does the coordination, with public APIs (and
one
private handle, to record a trial's first heartbeat):

- items are enqueued and popped from the study's queue (the RDB pop is atomic; on sqlite only
because
  every transaction takes the write lock at BEGIN), so each worker takes different items;
- a trial keeps a heartbeat, recorded before its work starts; a worker that dies (SIGKILL, power
loss)
  stops beating, and after the grace period any worker's ``fail_stale_trials`` marks its trial FAIL,
  exactly once, and ``RetryHeartbeatStaleTrialCallback(max_retry=1)`` enqueues one retry;
- two trials of one item that slipped through at the same moment are resolved by trial number: the
  later one is PRUNED unevaluated ("claimed"), never FAILED.

A worker returns when every item is COMPLETE (by itself or by others), so all workers agree on the
result.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import optuna
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event

HEARTBEAT_SECONDS = 30
SQLITE_LOCK_WAIT_SECONDS = (
    60  # how long a SQLite transaction waits for another worker's lock before failing
)
MAX_FAILURES = 2  # an item that failed this often (errors, not dead workers) stops the search


T = TypeVar("T")


def retry_lost_race(
    action: Callable[[], T], lost_race: Callable[[Exception], bool], attempts: int
) -> T:
    """``action()``, tried again (after 0.5 s, 1 s, ...) while it fails because another worker did
    the same
    thing at the same moment (``lost_race``), up to ``attempts`` tries in all; any other error is
    raised."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception as exc:
            if attempt == attempts - 1 or not lost_race(exc):
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def lock_sqlite_transactions_at_begin(engine: sqlalchemy.engine.Engine) -> None:
    """Make every transaction on a SQLite ``engine`` take the write lock when it begins (``BEGIN
    IMMEDIATE``).

    Optuna pops a queued trial by reading it WAITING and writing it RUNNING in one transaction,
    locked with
    ``SELECT ... FOR UPDATE``, which SQLite ignores; and Python's sqlite3 starts the transaction
    only at
    the write. Two workers could both read WAITING and both run the trial (optuna/optuna#4621; 10-16
    % of
    pops with four processes here). Taken at ``BEGIN``, the lock makes the read and the write one
    step.
    """

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = (
            None  # the driver then leaves BEGIN to the "begin" event below
        )

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners (table creation) are not reused


def heartbeat_storage(
    url: str, heartbeat_seconds: int = HEARTBEAT_SECONDS
) -> optuna.storages.RDBStorage:
    """An RDB storage whose running trials beat every ``heartbeat_seconds``; silent for twice that,
    they are stale."""
    if heartbeat_seconds < 1:
        raise ValueError(f"heartbeat_seconds must be at least 1, got {heartbeat_seconds}")
    sqlite = url.startswith("sqlite")

    def storage() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(
                url,
                engine_kwargs={"connect_args": {"timeout": SQLITE_LOCK_WAIT_SECONDS}}
                if sqlite
                else None,
                heartbeat_interval=heartbeat_seconds,
                grace_period=2 * heartbeat_seconds,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1
                ),
            )
        if sqlite:
            lock_sqlite_transactions_at_begin(rdb.engine)
        return rdb

    # workers that start together on a new database race to create its tables: the loser retries
    return retry_lost_race(
        storage, lambda exc: isinstance(exc, sqlalchemy.exc.SQLAlchemyError), attempts=5
    )


def item_of(trial: FrozenTrial, param: str) -> Hashable | None:
    """The item a trial is for: its parameter, or, for a queued or just-popped trial that has not
    asked for
    it yet, the value it was enqueued with (set atomically with the trial)."""
    if param in trial.params:
        return trial.params[param]
    return trial.system_attrs.get("fixed_params", {}).get(param)


def claim(study: optuna.Study, trial: optuna.Trial, param: str, item: Hashable) -> None:
    """Prune ``trial`` unevaluated when an earlier trial of the same item is queued, running or
    complete."""
    for other in study.get_trials(
        deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    ):
        if (
            other.number != trial.number
            and item_of(other, param) == item
            and (other.state == TrialState.COMPLETE or other.number < trial.number)
        ):
            trial.set_user_attr("claimed_by", other.number)
            raise optuna.TrialPruned(f"{param}={item} is already taken by trial {other.number}")


def frozen(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    """The stored record of a live trial (its system attributes: queue origin, retry history)."""
    return frozen_by_number(study, trial.number)


def frozen_by_number(study: optuna.Study, number: int) -> FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def popped_from_queue(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether a running trial came from the study's queue, rather than being created because it was
    empty."""
    return "fixed_params" in frozen(study, trial).system_attrs


def trials_by_item(study: optuna.Study, param: str) -> dict[Hashable, list[FrozenTrial]]:
    out: dict[Hashable, list[FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False):
        item = item_of(trial, param)
        if item is not None:
            out.setdefault(item, []).append(trial)
    return out


def record_heartbeat(study: optuna.Study, trial: optuna.Trial) -> None:
    """Record the trial's heartbeat now, before its work starts.

    Optuna's heartbeat thread records the first beat beside the objective, not before it, and a
    RUNNING
    trial with no beat is never judged stale (by design, optuna/optuna#4054): a worker killed before
    that
    first beat left its item RUNNING for ever and every other worker waiting for it (seen in the
    kill
    test). What remains is the moment between Optuna's pop and this call.
    """
    storage = study._storage  # Optuna has no public handle on a study's storage or a trial's ID
    if hasattr(storage, "record_heartbeat") and storage.get_heartbeat_interval():
        storage.record_heartbeat(trial._trial_id)


def run_shared(
    study: optuna.Study,
    param: str,
    items: Sequence[Hashable],
    evaluate: Callable[[optuna.Trial, Hashable], float],
    ready: Callable[[Hashable, dict[Hashable, FrozenTrial]], bool] | None = None,
    poll_seconds: float = 2.0,
    max_failures: int = MAX_FAILURES,
    callbacks: Sequence[Callable] = (),
) -> dict[Hashable, FrozenTrial]:
    """Evaluate every item exactly once across all workers of ``study``; return each item's COMPLETE
    trial.

    ``ready(item, done)`` says whether an item's prerequisites are complete (default: always), so a
    worker only queues what can run now and waits while others finish the rest.
    """
    choices = list(items)
    evaluated: list[int] = []  # the trial this worker just evaluated, if it got that far

    def objective(trial: optuna.Trial) -> float:
        record_heartbeat(study, trial)
        if not popped_from_queue(study, trial):  # the queue emptied between our look and our pop
            raise optuna.TrialPruned("no queued item left when this trial started")
        item = trial.suggest_categorical(param, choices)
        claim(study, trial, param, item)
        value = evaluate(trial, item)
        evaluated.append(trial.number)
        return value

    waited = False
    while True:
        with warnings.catch_warnings():  # a dead worker's trial: FAIL once, one retry queued
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        by_item = trials_by_item(study, param)
        done = {
            item: t
            for item in choices
            for t in by_item.get(item, [])
            if t.state == TrialState.COMPLETE
        }
        if len(done) == len(choices):
            return done
        queued = False
        for item in choices:
            trials = by_item.get(item, [])
            if item in done or any(
                t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials
            ):
                queued |= any(t.state == TrialState.WAITING for t in trials)
                continue
            failures = sum(t.state == TrialState.FAIL for t in trials)
            if failures > max_failures:
                raise RuntimeError(
                    f"{param}={item} failed {failures} times in study {study.study_name!r}; "
                    "see the failed trials' errors above or in the study"
                )
            if ready is None or ready(item, done):
                study.enqueue_trial({param: item})
                queued = True
        if queued:
            waited = False
            evaluated.clear()
            try:
                study.optimize(objective, n_trials=1, catch=(), callbacks=list(callbacks))
            except Exception:
                if not evaluated or frozen_by_number(study, evaluated[0]).state != TrialState.FAIL:
                    raise
                # we evaluated the item, but our heartbeat came later than the grace period (a
                # stalled
                # machine, a slow database), so another worker took us for dead and failed the trial
                # (Optuna then refuses our result): its retry evaluates the item again
                warnings.warn(
                    f"study {study.study_name!r}: trial {evaluated[0]} was failed by another "
                    "worker that judged this "
                    "one dead (no heartbeat within the grace period); its result is discarded and "
                    "the item's retry runs "
                    "instead.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        else:
            if not waited:
                print(
                    f"waiting for other workers of study {study.study_name!r} "
                    f"({len(done)}/{len(choices)} complete)",
                    flush=True,
                )
                waited = True
            time.sleep(poll_seconds)
