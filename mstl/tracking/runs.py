"""Reading the runs back for the report: the finished Target runs of an experiment (or of one grid)
with their predictions, and the evaluate runs of their logged models.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mstl import defaults
from mstl.tracking import MODEL_ID_TAG, tracking_uri


def descends_from(run, ancestor: str, parents: dict[str, str]) -> bool:
    current = run.data.tags.get("mlflow.parentRunId")
    while current:
        if current == ancestor:
            return True
        current = parents.get(current)
    return False


def grid_members(client, run_id: str, tmp: Path) -> set[str] | None:
    """The run IDs of an experiment grid's cells, whichever worker ran them and whether reused
    (its ``grid/cells.csv``); None for a run that is not a grid."""
    if "grid/cells.csv" not in {a.path for a in client.list_artifacts(run_id, "grid")}:
        return None
    return set(pd.read_csv(client.download_artifacts(run_id, "grid/cells.csv", str(tmp)))["run_id"])


def collect(client, experiment_name: str, tmp: Path, parent_run: str = "") -> pd.DataFrame:
    """One row per finished Target run (under ``parent_run`` when given): tags, seed, metrics,
    val/test predictions."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"no experiment named {experiment_name!r} on {tracking_uri()}")
    everything = client.search_runs([experiment.experiment_id], max_results=50_000)
    parents = {r.info.run_id: r.data.tags.get("mlflow.parentRunId", "") for r in everything}
    members = grid_members(client, parent_run, tmp) if parent_run else None
    runs = [
        r
        for r in everything
        if r.data.tags.get("stage") == "target"
        and r.info.status == "FINISHED"
        and (
            not parent_run
            or (
                r.info.run_id in members
                if members is not None
                else descends_from(r, parent_run, parents)
            )
        )
    ]
    if not runs:
        where = f"under run {parent_run}" if parent_run else f"in experiment {experiment_name!r}"
        raise ValueError(f"no finished Target run {where}")
    rows = []
    for run in runs:
        folder = tmp / run.info.run_id
        folder.mkdir()
        predictions = {
            part: pd.read_csv(
                client.download_artifacts(run.info.run_id, f"predictions/{part}.csv", str(folder))
            )
            for part in ("val", "test")
        }
        rows.append(
            {
                "run_id": run.info.run_id,
                "backbone": run.data.tags.get("backbone"),
                "strategy": run.data.tags.get("strategy"),
                "split": run.data.tags.get("split"),
                "seed": int(run.data.params.get("seed", 0)),
                "image_size": int(run.data.params.get("image_size", 0)),
                "epochs": int(run.data.params.get("epochs", 0)),
                "threshold": float(run.data.params.get("threshold", defaults.THRESHOLD)),
                "model_id": run.data.tags.get(MODEL_ID_TAG, ""),
                "metrics": run.data.metrics,
                "val": predictions["val"],
                "test": predictions["test"],
            }
        )
    return pd.DataFrame(rows)


def collect_external(client, runs: pd.DataFrame, tmp: Path) -> pd.DataFrame:
    """The `evaluate` runs (in any experiment) of these Target runs' logged models: one row per
    Target run and external data set (the latest evaluation when there are several), with its
    metrics and predictions."""
    wanted = {m: run_id for m, run_id in zip(runs["model_id"], runs["run_id"], strict=True) if m}
    if not wanted:
        return pd.DataFrame(
            columns=["run_id", "data", "digest", "evaluate_run_id", "metrics", "predictions"]
        )
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(
        experiments,
        "tags.stage = 'evaluate' and attributes.status = 'FINISHED'",
        max_results=50_000,
    )
    latest: dict[tuple[str, str], object] = {}
    for ev in sorted(found, key=lambda r: r.info.start_time):
        model_id = ev.data.tags.get("mstl.evaluated_model_id", "")
        if model_id in wanted:
            latest[(wanted[model_id], ev.data.tags["data_digest"])] = ev
    rows = []
    for (run_id, digest), ev in latest.items():
        folder = tmp / "external" / ev.info.run_id
        folder.mkdir(parents=True)
        predictions = pd.read_csv(
            client.download_artifacts(ev.info.run_id, "predictions.csv", str(folder))
        )
        name = ev.data.tags["data_name"]
        rows.append(
            {
                "run_id": run_id,
                "data": name,
                "digest": digest,
                "evaluate_run_id": ev.info.run_id,
                "metrics": ev.data.metrics,
            }
            | {"predictions": predictions}
        )
    return pd.DataFrame(
        rows, columns=["run_id", "data", "digest", "evaluate_run_id", "metrics", "predictions"]
    )
