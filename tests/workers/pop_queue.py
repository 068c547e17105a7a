"""A worker that runs queued trials of a study, doing no work in them, until the queue is empty.

python -m tests.workers.pop_queue STORAGE STUDY OUT.json   (OUT.json: the numbers of the trials it ran)
"""

import json
import sys

import optuna

from mstl.tracking.work import frozen, heartbeat_storage
from tests.workers.shared_items import start_together


def main() -> None:
    storage, name, out = sys.argv[1:4]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=heartbeat_storage(storage))
    start_together(out)
    ran: list[int] = []
    empty: list[bool] = []

    def objective(trial: optuna.Trial) -> float:
        if "fixed_params" not in frozen(study, trial).system_attrs:  # a fresh trial: the queue is empty
            empty.append(True)
        else:
            ran.append(trial.number)
        return 0.0

    while not empty:
        study.optimize(objective, n_trials=1)
    with open(out, "w") as f:
        json.dump(ran, f)


if __name__ == "__main__":
    main()
