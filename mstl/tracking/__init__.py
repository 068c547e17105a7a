"""MLflow plumbing shared by every stage: where runs go, and how tables and pictures are logged.

With no MLFLOW_TRACKING_URI the embedded default is ``sqlite:///mlflow.db`` in the working folder
with artifacts under ``./mlartifacts``; any URI that is set (an http server, PostgreSQL) wins.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import hashlib
import json
import os
import urllib.parse
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


# MLflow 3.17's UI chooses GenAI or model-training pages from its own switch (the browser's
# localStorage, default GenAI), not from the experiment's tag: a link carries the switch instead.
UI_WORKFLOW = {"workflowType": "machine_learning"}
UI_DEFAULT_BASE = "http://127.0.0.1:5000"  # `make server`
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # the UI's "Share" button stores a view here
COMPARISON_VIEW = "mstl-vs-imagenet"
COMPARISON_FILTER = "tags.stage = 'target' and attributes.status = 'FINISHED'"
COMPARISON_COLUMNS = (
    "tags.`backbone`",
    "tags.`split`",
    "params.`seed`",
    "metrics.`test_roc_auc`",
    "metrics.`test_recall`",
    "metrics.`test_specificity`",
    "metrics.`val_recall`",
)


def ui_base(uri: str | None = None) -> str:
    """Where the UI answers: the tracking server itself, or `make server` for a local store."""
    uri = uri or tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_DEFAULT_BASE


def ui_url(route: str, uri: str | None = None, **query: str) -> str:
    """A UI link (``route`` like ``experiments/1/runs``) that opens on the model-training pages."""
    return f"{ui_base(uri)}/#/{route}?{urllib.parse.urlencode({**UI_WORKFLOW, **query})}"


def comparison_view_state(group_by: str = "strategy") -> dict:
    """The runs table of "does MSTL beat ImageNet?": finished Target runs only (not the grid's
    parents, not a killed worker's runs), grouped by ``group_by`` (grouping flattens the nesting
    experiment -> transition -> target), test figures as columns, sorted by test ROC AUC."""
    return {
        "searchFilter": COMPARISON_FILTER,
        "orderByKey": "metrics.`test_roc_auc`",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": list(COMPARISON_COLUMNS),
        "runsHiddenMode": "SHOW_ALL",  # charts show every run, not the first 10
        "groupBy": {
            "aggregateFunction": "average",
            "groupByKeys": [{"mode": "tag", "groupByData": group_by}],
        },
        "groupsExpanded": {},
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "chartsSearchFilter": "test_roc_auc",  # its charts: the value and its interval
    }


def share_comparison_view(experiment_id: str, uri: str | None = None) -> str:
    """Store the comparison view on the experiment as the UI's own shared view; return its link."""
    client = mlflow.MlflowClient(uri or tracking_uri())
    client.set_experiment_tag(
        experiment_id, SHARED_VIEW_PREFIX + COMPARISON_VIEW, json.dumps(comparison_view_state())
    )
    return ui_url(f"experiments/{experiment_id}/runs", uri, viewStateShareKey=COMPARISON_VIEW)


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


def log_ui_table(df: pd.DataFrame, artifact_file: str) -> None:
    """Log a DataFrame with ``mlflow.log_table`` (JSON, ``artifact_file`` ending in ``.json``): the
    run page's artifact view shows it as a table, where a CSV shows as text."""
    mlflow.log_table(data=df, artifact_file=artifact_file)


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
        experiment_id = ensure_experiment(args.name)
        print(f"experiment {args.name!r}: id {experiment_id} at {tracking_uri()}")
        print(f"in the MLflow UI: {ui_url(f'experiments/{experiment_id}/runs')}")


if __name__ == "__main__":
    main()
