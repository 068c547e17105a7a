"""MLflow plumbing shared by every stage: where runs go, and how tables and pictures are logged.

With no MLFLOW_TRACKING_URI the embedded default is ``sqlite:///mlflow.db`` in the working folder
with artifacts under ``./mlartifacts``; any URI that is set (an http server, PostgreSQL) wins.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import hashlib
import os
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import pandas as pd

from mstl import PACKAGE_DIR, defaults
from mstl.tracking.work import retry_lost_race  # not at import: it brings Optuna

EMBEDDED_URI = "sqlite:///mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"


def tracking_uri() -> str:
    """The URI in force: MLFLOW_TRACKING_URI when set, else the embedded sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or EMBEDDED_URI


def is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


# What MLflow's UI reads from an experiment's tags: open on the runs (model training, not MLflow 3's
# GenAI overview of traces), and chart and sort by the threshold-free figure MSTL is judged on.
UI_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.experiment.primaryMetric.name": "test_roc_auc",
}


def ensure_experiment(name: str = defaults.EXPERIMENT_NAME) -> str:
    """Create the experiment if needed (on a local store its artifacts go under ./mlartifacts),
    tagged for the UI either way."""
    mlflow.set_tracking_uri(tracking_uri())
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if is_local_store(tracking_uri()):
            location = Path(EMBEDDED_ARTIFACTS).resolve().as_uri()
        experiment = mlflow.get_experiment(
            mlflow.create_experiment(name, artifact_location=location)
        )
    tag_for_the_ui(experiment)
    return experiment.experiment_id


def tag_for_the_ui(experiment) -> None:
    """Set the UI tags the experiment lacks; a value a user chose is left alone."""
    client = mlflow.MlflowClient(tracking_uri())
    for key, value in UI_TAGS.items():
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)


def code_version() -> str:
    """A hash of the mstl package's source: runs of the same stage with the same code share it."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


_RUN_TAGS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "mstl_run_tags", default=None
)


@contextlib.contextmanager
def run_tags(tags: dict):
    """Tags that every stage run started inside this block carries (the experiment grid marks its
    cells)."""
    token = _RUN_TAGS.set({**(_RUN_TAGS.get() or {}), **tags})
    try:
        yield
    finally:
        _RUN_TAGS.reset(token)


def start_stage_run(
    experiment: str,
    run_name: str,
    tags: dict | None = None,
    experiment_id: str | None = None,
    log_system_metrics: bool = False,
):
    """Start a stage's run, tagged with the code version (and any ``run_tags`` in force).

    Under `mlflow run` it resumes the run MLflow created (MLFLOW_RUN_ID). Inside another stage's run
    (the experiment grid) it is a nested child of that run, in its experiment. Otherwise it goes to
    ``experiment_id`` when given, else the named experiment.
    """
    tags = {"mstl.code_version": code_version(), **(_RUN_TAGS.get() or {}), **(tags or {})}
    system = (
        {"log_system_metrics": True} if log_system_metrics else {}
    )  # opt-in (MLflow's default stays off)
    if mlflow.active_run() is not None:
        return mlflow.start_run(run_name=run_name, tags=tags, nested=True, **system)
    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment_id=experiment_id or ensure_experiment(experiment))
    run = mlflow.start_run(run_name=run_name, tags=tags, **system)
    # `mlflow run --experiment-name` creates the experiment itself, without the UI tags
    tag_for_the_ui(mlflow.get_experiment(run.info.experiment_id))
    return run


def find_finished_run(stage: str, params: dict, experiment_id: str) -> str | None:
    """A FINISHED run of ``stage`` with these exact params and this code version, if the server has
    one."""
    clauses = [
        f"tags.stage = '{stage}'",
        "attributes.status = 'FINISHED'",
        f"tags.`mstl.code_version` = '{code_version()}'",
    ]
    clauses += [f"params.`{key}` = '{format_param(value)}'" for key, value in params.items()]
    runs = mlflow.MlflowClient(tracking_uri()).search_runs(
        [experiment_id], " and ".join(clauses), max_results=1
    )
    return runs[0].info.run_id if runs else None


def resolve_run(ref: str, stage: str | None = None):
    """A run from its ID or a ``runs:/<id>[/path]`` URI, checked to be of the expected ``stage``
    tag."""
    run_id = ref[len("runs:/") :].split("/", 1)[0] if ref.startswith("runs:/") else ref.strip()
    if not run_id:
        raise ValueError(f"expected a run ID or runs:/ URI, got {ref!r}")
    try:
        run = mlflow.MlflowClient(tracking_uri()).get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise ValueError(
            f"no run {run_id!r} on the tracking server {tracking_uri()} ({exc.message})"
        ) from None
    found = run.data.tags.get("stage")
    if stage and found != stage:
        raise ValueError(f"run {run_id} is a {found or 'untagged'} run, expected a {stage} run")
    return run


def format_param(value) -> str:
    """Parameter values as MLproject spells them (``true``/``false`` for booleans)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def log_params(params: dict) -> None:
    """Log params, leaving alone any the run already has: ``mlflow run`` logs its ``-P`` values
    as typed (``1e-3``, ``64.0``), and MLflow refuses to change a logged value."""
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    mlflow.log_params({k: format_param(v) for k, v in params.items() if k not in existing})


def log_table(df: pd.DataFrame, artifact_file: str) -> None:
    """Log a DataFrame as a CSV artifact at ``artifact_file`` (e.g. ``data/split.csv``): CSV, not
    ``mlflow.log_table``'s JSON, because the report, users and spreadsheets read it back."""
    mlflow.log_text(df.to_csv(index=False), artifact_file)


@contextlib.contextmanager
def mlflow_false_alarms_silenced():
    """Silence two MLflow warnings that never apply here, by their exact text, so that a warning a
    user does see means something: every other warning still shows.

    - "Inferred schema contains integer column(s) ... cannot represent missing values": our integer
      columns are class labels, which are never missing (a missing label is refused when read).
    - "can be interpreted in multiple ways: LocalArtifactDatasetSource, LocalArtifactDatasetSource":
      MLflow registers its local-file data set source twice (for the schemes "" and "file") and then
      finds a local path matched by both copies of the one class. A real ambiguity (two different
      classes) still warns.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", r"Hint: Inferred schema contains integer column", UserWarning
        )
        warnings.filterwarnings(
            "ignore",
            r"The specified dataset source can be interpreted in multiple ways: "
            r"LocalArtifactDatasetSource, LocalArtifactDatasetSource\.",
            UserWarning,
        )
        yield


def log_dataset(
    df: pd.DataFrame, name: str, source: str, digest: str, context: str, targets: str | None = None
):
    """Record ``df`` as an MLflow data set input of the active run (the UI's Datasets column) and
    return it, so metrics can be linked to it. ``digest`` is a content hash (of the files, not of
    the table)."""
    with (
        mlflow_false_alarms_silenced()
    ):  # the source is resolved here, the schema inferred when logged
        dataset = mlflow.data.from_pandas(
            df, source=source, name=name, digest=digest[:DIGEST_CHARS], targets=targets
        )
        # Two grid workers logging the same new data set at once: the store looks the data set up,
        # finds none, and both insert it; the second insert breaks the unique key (experiment, name,
        # digest). The data set exists now, so the retry finds it and only links it to this run.
        retry_lost_race(
            lambda: mlflow.log_input(dataset, context=context),
            lambda exc: (
                isinstance(exc, mlflow.exceptions.MlflowException) and is_duplicate_dataset(exc)
            ),
            attempts=3,
        )
    return dataset


def is_duplicate_dataset(exc: Exception) -> bool:
    """The tracking store's unique-key error for a data set another run inserted first (sqlite,
    PostgreSQL, MySQL)."""
    text = str(exc)
    return "datasets" in text and any(
        m in text for m in ("UNIQUE constraint failed", "duplicate key", "Duplicate entry")
    )


# The run tag naming a stage's logged model (a Target's served model, a Transition's checkpoint
# record).
MODEL_ID_TAG = "mstl.model_id"
DIGEST_CHARS = 16  # MLflow stores a data set digest in at most 36 characters


def log_figure(fig, artifact_file: str) -> None:
    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="MLflow helpers for the Makefile.")
    sub = parser.add_subparsers(dest="command", required=True)
    ensure = sub.add_parser(
        "ensure-experiment", help="create the experiment (artifacts in ./mlartifacts locally)"
    )
    ensure.add_argument("name", nargs="?", default=defaults.EXPERIMENT_NAME)
    args = parser.parse_args(argv)
    if args.command == "ensure-experiment":
        print(f"experiment {args.name!r}: id {ensure_experiment(args.name)} at {tracking_uri()}")


if __name__ == "__main__":
    main()
