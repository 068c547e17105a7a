"""A worker of `mstl.tracking.work.run_shared` over items a..d; each evaluation sleeps, so workers
overlap.

python -m tests.workers.shared_items STORAGE STUDY OUT.json [--die-on ITEM [--no-heartbeat-thread]]

``--no-heartbeat-thread``: Optuna's heartbeat thread never beats, as when SIGKILL lands before its
first beat.
"""

import json
import os
import sys
import time

import optuna

from mstl.tracking.work import heartbeat_storage, run_shared
from tests.workers import start_together

ITEMS = ["a", "b", "c", "d"]
# stale after 2x: wide enough that a loaded CI machine never makes a live worker look dead (seen at
# 1 s)
HEARTBEAT_SECONDS = 3


def main() -> None:
    storage, name, out = sys.argv[1:4]
    die_on = sys.argv[5] if len(sys.argv) > 5 and sys.argv[4] == "--die-on" else None
    if "--no-heartbeat-thread" in sys.argv:
        from optuna.storages._heartbeat import HeartbeatThread

        HeartbeatThread.start = HeartbeatThread.join = lambda self: None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name, storage=heartbeat_storage(storage, HEARTBEAT_SECONDS), load_if_exists=True
    )
    start_together(out, int(os.environ.get("BARRIER_WORKERS", "0")), timeout=60)
    evaluated = []

    def evaluate(trial, item):
        evaluated.append(item)
        with open(out + ".log", "a") as log:
            log.write(f"{os.getpid()} {item}\n")
        if item == die_on:
            os.kill(os.getpid(), 9)  # SIGKILL mid-item: no cleanup, the trial is left RUNNING
        time.sleep(0.6)
        return float(ITEMS.index(item))

    done = run_shared(study, "item", ITEMS, evaluate, poll_seconds=0.3)
    with open(out, "w") as f:
        json.dump({"evaluated": evaluated, "done": sorted(done)}, f)


if __name__ == "__main__":
    main()
