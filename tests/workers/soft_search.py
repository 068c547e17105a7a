"""One worker of the soft-label search for k, on planted clusters, sharing an Optuna study with
others.

python -m tests.workers.soft_search OPTUNA_STORAGE MLFLOW_URI OUT.json N_WORKERS

Each worker waits for the others to be ready (files beside OUT.json) before it searches, so they
overlap.
"""

import json
import sys

import mlflow
import numpy as np
from sklearn.datasets import make_blobs

from mstl.stages.soft_labels import SoftLabelParams, search_k
from tests.workers import start_together


def main() -> None:
    storage, tracking, out, n_workers = *sys.argv[1:4], int(sys.argv[4])
    x, _ = make_blobs(n_samples=6000, centers=4, n_features=64, cluster_std=1.0, random_state=0)
    start_together(out, n_workers, timeout=120)
    mlflow.set_tracking_uri(tracking)
    params = SoftLabelParams(manifest="x", k_values="2,4,8,16", folds=5, heartbeat_seconds=5)
    with mlflow.start_run() as parent:
        study = search_k(x.astype(np.float32), params, storage, "two-workers", parent)
    runs = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    with open(out, "w") as f:
        json.dump(
            {
                "evaluated": sorted(int(k) for k in runs.get("params.k", [])),
                "best_k": int(study.best_trial.params["k"]),
            },
            f,
        )


if __name__ == "__main__":
    main()
