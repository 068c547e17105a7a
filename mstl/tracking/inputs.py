"""Inputs a stage reads from an earlier stage's run: a prepare_transition export and its manifest,
soft labels."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import pandas as pd

from mstl.tracking import log_dataset, resolve_run


def load_manifest(run_ref: str) -> tuple[pd.DataFrame, Path]:
    """A prepare_transition run's manifest and the folder its slice files are under.

    Uses the run's local export folder when it is on this machine, else downloads the run's
    artifacts.
    """
    run = resolve_run(run_ref, stage="prepare_transition")
    local = Path(run.data.params.get("export_path", ""))
    if (local / "manifest.csv").is_file():
        return pd.read_csv(local / "manifest.csv"), local
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    if "manifest.csv" not in names:
        raise FileNotFoundError(
            f"prepare_transition run {run.info.run_id} has no manifest.csv artifact"
        )
    if "slices" not in names:
        raise FileNotFoundError(
            f"prepare_transition run {run.info.run_id} logged no slices (log_slices=false) "
            f"and its export folder {local} is not on this machine"
        )
    folder = Path(tempfile.mkdtemp(prefix=f"manifest-{run.info.run_id[:8]}-"))
    for name in ("manifest.csv", "slices"):
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=name, dst_path=str(folder)
        )
    return pd.read_csv(folder / "manifest.csv"), folder


def log_export_input(
    manifest_run: str, table: pd.DataFrame, context: str, targets: str | None = None
) -> None:
    """Record a prepare_transition export as this run's data set: named and digested by its export
    key (a hash of every input file and the selection parameters), sourced from the prepare run's
    export folder."""
    run = resolve_run(manifest_run, stage="prepare_transition")
    key = run.data.params.get("export_key", "")
    log_dataset(
        table,
        name=f"transition-export-{key[:8]}",
        source=run.data.params.get("export_path") or str(Path(key)),
        digest=key,
        context=context,
        targets=targets,
    )


def load_soft_labels(ref: str) -> pd.DataFrame:
    """(file, cluster) from a CSV path or a soft_labels run's labels.csv artifact."""
    path = Path(ref)
    if not path.is_file():
        run = resolve_run(ref, stage="soft_labels")
        path = Path(
            mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="labels.csv")
        )
    table = pd.read_csv(path)
    if not {"file", "cluster"} <= set(table.columns):
        raise ValueError(
            f"soft labels {ref} need columns file and cluster; has {list(table.columns)}"
        )
    return table[["file", "cluster"]]
