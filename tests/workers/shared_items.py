"""A worker of `mstl.tracking.work.run_shared` over items a..d; each evaluation sleeps, so workers overlap.

python -m tests.workers.shared_items STORAGE STUDY OUT.json [--die-on ITEM [--no-heartbeat-thread]]

``--no-heartbeat-thread``: Optuna's heartbeat thread never beats, as when SIGKILL lands before its first beat.
"""

import json
import os
import sys
import time
from pathlib import Path

import optuna

from mstl.tracking.work import heartbeat_storage, run_shared

ITEMS = ["a", "b", "c", "d"]
# stale after 2x: wide enough that a loaded CI machine never makes a live worker look dead (seen at 1 s)
HEARTBEAT_SECONDS = 3


def start_together(out: str) -> None:
    """Return when BARRIER_WORKERS workers writing beside ``out`` are ready (at most 60 s), so they race."""
    barrier = int(os.environ.get("BARRIER_WORKERS", "0"))
    Path(out + ".ready").touch()
    deadline = time.time() + 60
    while len(list(Path(out).parent.glob("*.ready"))) < barrier and time.time() < deadline:
        time.sleep(0.01)


def main() -> None:
    storage, name, out = sys.argv[1:4]
    die_on = sys.argv[5] if len(sys.argv) > 5 and sys.argv[4] == "--die-on" else None
    if "--no-heartbeat-thread" in sys.argv:
        from optuna.storages._heartbeat import HeartbeatThread

        HeartbeatThread.start = HeartbeatThread.join = lambda self: None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=heartbeat_storage(storage, HEARTBEAT_SECONDS), load_if_exists=True)
    start_together(out)
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
