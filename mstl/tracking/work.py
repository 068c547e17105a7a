"""Work shared by several processes through an Optuna study on an RDB storage (sqlite, PostgreSQL).

Each item of work (a cluster count k of the soft-label search, a cell of the experiment grid) is an
Optuna trial with the item as its one parameter. Optuna does the coordination, with public APIs:

- items are enqueued and popped from the study's queue (the RDB pop is atomic; on sqlite only
  because every transaction takes the write lock at BEGIN), so each worker takes different items;
- a trial keeps a heartbeat, recorded by the storage as it pops the trial, before its work starts; a
  worker that dies (SIGKILL, power loss) stops beating, and after the grace period any worker's
  ``fail_stale_trials`` marks its trial FAIL, exactly once, and
  ``RetryHeartbeatStaleTrialCallback(max_retry=1)`` enqueues one retry;
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
# how long a SQLite transaction waits for another worker's lock before failing
SQLITE_LOCK_WAIT_SECONDS = 60
MAX_FAILURES = 2  # an item that failed this often (errors, not dead workers) stops the search


T = TypeVar("T")


def retry_lost_race(
    action: Callable[[], T], lost_race: Callable[[Exception], bool], attempts: int
) -> T:
    """``action()``, tried again (after 0.5 s, 1 s, ...) while it fails because another worker did
    the same thing at the same moment (``lost_race``), up to ``attempts`` tries in all; any other
    error is raised."""
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
    locked with ``SELECT ... FOR UPDATE``, which SQLite ignores; and Python's sqlite3 starts the
    transaction only at the write. Two workers could both read WAITING and both run the trial
    (optuna/optuna#4621; 10-16 % of pops with four processes here). Taken at ``BEGIN``, the lock
    makes the read and the write one step.
    """

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record) -> None:
        # the driver then leaves BEGIN to the "begin" event below
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners (table creation) are not reused


def record_first_heartbeat(storage: optuna.storages.RDBStorage, trial_id: int) -> None:
    """Record the heartbeat of a trial ``storage`` has just started, before its work starts.

    Optuna's heartbeat thread records the first beat beside the objective, not before it, and a
    RUNNING trial with no beat is never judged stale (by design, optuna/optuna#4054): a worker
    killed before that first beat left its item RUNNING for ever and every other worker waiting
    for it (seen in the kill test). If the beat cannot be recorded the trial is failed, as Optuna
    fails a trial whose objective raised, so that it is not left RUNNING with no beat either.
    """
    try:
        storage.record_heartbeat(trial_id)
    except Exception:
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        raise


class FirstBeatRDBStorage(optuna.storages.RDBStorage):
    """An RDB storage that records a trial's first heartbeat the moment it pops the trial.

    Optuna has no public handle on a study's storage or on a live trial's ID, so the beat is
    recorded by the storage itself, in the public method through which Optuna pops a queued trial
    (WAITING to RUNNING). What remains is the moment between the pop and the beat. Trials created
    RUNNING because the queue was empty are not covered: they carry no item, and ``run_shared``
    prunes them at once.
    """

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        if changed and state == TrialState.RUNNING:
            record_first_heartbeat(self, trial_id)
        return changed


def heartbeat_storage(
    url: str, heartbeat_seconds: int = HEARTBEAT_SECONDS
) -> optuna.storages.RDBStorage:
    """An RDB storage whose running trials beat every ``heartbeat_seconds``, from the moment they
    are popped; silent for twice that, they are stale."""
    if heartbeat_seconds < 1:
        raise ValueError(f"heartbeat_seconds must be at least 1, got {heartbeat_seconds}")
    sqlite = url.startswith("sqlite")

    def storage() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = FirstBeatRDBStorage(
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
    asked for it yet, the value it was enqueued with (set atomically with the trial)."""
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


def shared_objective(
    study: optuna.Study,
    param: str,
    choices: list[Hashable],
    evaluate: Callable[[optuna.Trial, Hashable], float],
    evaluated: list[int],
) -> Callable[[optuna.Trial], float]:
    """The objective of a popped trial: evaluate its item unless the trial is not one to run (the
    queue emptied before the pop, or another trial has the item); record in ``evaluated`` that it
    got as far as a result, so a later failure can be told apart from an error in the work."""

    def objective(trial: optuna.Trial) -> float:
        if not popped_from_queue(study, trial):  # the queue emptied between our look and our pop
            raise optuna.TrialPruned("no queued item left when this trial started")
        item = trial.suggest_categorical(param, choices)
        claim(study, trial, param, item)
        value = evaluate(trial, item)
        evaluated.append(trial.number)
        return value

    return objective


def fail_dead_workers_trials(study: optuna.Study) -> None:
    """Fail dead workers' trials (each once; the storage's callback queues one retry), so their
    items do not wait for ever."""
    with warnings.catch_warnings():  # a dead worker's trial: FAIL once, one retry queued
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def complete_trials(
    by_item: dict[Hashable, list[FrozenTrial]], choices: list[Hashable]
) -> dict[Hashable, FrozenTrial]:
    """Each item's COMPLETE trial, for the items that have one: the work is done when all do."""
    return {
        item: t for item in choices for t in by_item.get(item, []) if t.state == TrialState.COMPLETE
    }


def refuse_failing_item(
    study: optuna.Study, param: str, item: Hashable, trials: list[FrozenTrial], max_failures: int
) -> None:
    """Stop the search once an item has failed more than ``max_failures`` times: its error is in
    the work, not in a dead worker, and queueing it again would only repeat it."""
    failures = sum(t.state == TrialState.FAIL for t in trials)
    if failures > max_failures:
        raise RuntimeError(
            f"{param}={item} failed {failures} times in study {study.study_name!r}; "
            "see the failed trials' errors above or in the study"
        )


def queue_ready_items(
    study: optuna.Study,
    param: str,
    choices: list[Hashable],
    by_item: dict[Hashable, list[FrozenTrial]],
    done: dict[Hashable, FrozenTrial],
    ready: Callable[[Hashable, dict[Hashable, FrozenTrial]], bool] | None,
    max_failures: int,
) -> bool:
    """Enqueue every item that is not complete, queued or running and whose prerequisites are
    complete; return whether any item is now queued, that is whether this worker can pop one."""
    queued = False
    for item in choices:
        trials = by_item.get(item, [])
        if item in done or any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials):
            queued |= any(t.state == TrialState.WAITING for t in trials)
            continue
        refuse_failing_item(study, param, item, trials, max_failures)
        if ready is None or ready(item, done):
            study.enqueue_trial({param: item})
            queued = True
    return queued


def run_one_trial(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    evaluated: list[int],
    callbacks: Sequence[Callable],
) -> None:
    """Pop and run one queued trial. A trial that another worker failed while we evaluated it
    warns instead of raising: the work itself went well, and its queued retry runs it again."""
    evaluated.clear()
    try:
        study.optimize(objective, n_trials=1, catch=(), callbacks=list(callbacks))
    except Exception:
        if not evaluated or frozen_by_number(study, evaluated[0]).state != TrialState.FAIL:
            raise
        # we evaluated the item, but our heartbeat came later than the grace period (a stalled
        # machine, a slow database), so another worker took us for dead and failed the trial (Optuna
        # then refuses our result): its retry evaluates the item again
        warnings.warn(
            f"study {study.study_name!r}: trial {evaluated[0]} was failed by another worker that "
            "judged this one dead (no heartbeat within the grace period); its result is "
            "discarded and the item's retry runs instead.",
            RuntimeWarning,
            stacklevel=3,  # run_shared's caller, as before this was split out of run_shared
        )


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
    worker only queues what can run now and waits while others finish the rest. The study's
    storage should come from :func:`heartbeat_storage`, which beats from the moment of the pop.
    """
    choices = list(items)
    evaluated: list[int] = []  # the trial this worker just evaluated, if it got that far
    objective = shared_objective(study, param, choices, evaluate, evaluated)
    waited = False
    while True:
        fail_dead_workers_trials(study)
        by_item = trials_by_item(study, param)
        done = complete_trials(by_item, choices)
        if len(done) == len(choices):
            return done
        if queue_ready_items(study, param, choices, by_item, done, ready, max_failures):
            waited = False
            run_one_trial(study, objective, evaluated, callbacks)
        else:
            if not waited:
                print(
                    f"waiting for other workers of study {study.study_name!r} "
                    f"({len(done)}/{len(choices)} complete)",
                    flush=True,
                )
                waited = True
            time.sleep(poll_seconds)
