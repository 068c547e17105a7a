"""A worker that runs queued trials of a study, doing no work in them, until the queue is empty.

python -m tests.workers.pop_queue STORAGE STUDY OUT.json (OUT.json: the numbers of the trials it
ran)
"""

import json
import os
import sys

import optuna

from mstl.tracking.work import heartbeat_storage, popped_from_queue
from tests.workers import start_together


def main() -> None:
    storage, name, out = sys.argv[1:4]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=heartbeat_storage(storage))
    start_together(out, int(os.environ.get("BARRIER_WORKERS", "0")), timeout=60)
    ran: list[int] = []
    empty: list[bool] = []

    def objective(trial: optuna.Trial) -> float:
        if popped_from_queue(study, trial):
            ran.append(trial.number)
        else:  # a fresh trial: the queue is empty
            empty.append(True)
        return 0.0

    while not empty:
        study.optimize(objective, n_trials=1)
    with open(out, "w") as f:
        json.dump(ran, f)


if __name__ == "__main__":
    main()
