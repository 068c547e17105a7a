"""mstl.tracking on a real embedded store: a data set logged as a run input and read back through
the client."""

import json
import warnings
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from mstl.tracking import (
    COMPARISON_VIEW,
    SHARED_VIEW_PREFIX,
    UI_TAGS,
    ensure_experiment,
    log_dataset,
    log_table,
    log_ui_table,
    mlflow_false_alarms_silenced,
    share_comparison_view,
    start_stage_run,
    ui_url,
)


def test_a_logged_data_set_is_read_back_without_mlflows_false_alarms(local_tracking, tmp_path):
    table = pd.DataFrame(
        {"file": ["covid/a.png", "normal/b.png"], "label": [1, 0]}
    )  # integer labels, none missing
    with mlflow.start_run() as run, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log_dataset(
            table,
            name="covid-ct-official-train",
            source=str(tmp_path),
            digest="0123456789abcdef" * 4,
            context="training",
            targets="label",
        )
    # Without the filter, MLflow 3 warns twice here: a local path "can be interpreted in multiple
    # ways: LocalArtifactDatasetSource, LocalArtifactDatasetSource", and integer columns cannot hold
    # missing values.
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    (logged,) = mlflow.MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert logged.dataset.name == "covid-ct-official-train"
    assert logged.dataset.digest == ("0123456789abcdef" * 4)[: len(logged.dataset.digest)]
    assert {tag.key: tag.value for tag in logged.tags}["mlflow.data.context"] == "training"
    assert '"label"' in logged.dataset.schema  # the schema is still inferred and logged


@pytest.mark.parametrize(
    "message",
    [
        "The specified dataset source can be interpreted in multiple ways: "
        "LocalArtifactDatasetSource, "
        "HTTPDatasetSource. MLflow will assume that this is a HTTPDatasetSource source.",
        "Any other MLflow warning",
    ],
)
def test_only_the_two_false_alarms_are_silenced(message):
    with pytest.warns(UserWarning, match=message.split(":")[0]), mlflow_false_alarms_silenced():
        warnings.warn(message, UserWarning, stacklevel=1)


def test_a_logged_table_is_the_csv_pandas_writes_byte_for_byte(local_tracking, tmp_path):
    """log_table through mlflow.log_text: the artifact holds exactly ``df.to_csv(index=False)``,
    the file the old temporary-file route wrote, in the sub-folder named by the artifact path."""
    table = pd.DataFrame(
        {"file": ["a b.png", "c,d.png"], "probability": [0.25, 1 / 3], "label": [1, 0]}
    )
    with mlflow.start_run() as run:
        log_table(table, "predictions/test.csv")
        log_table(table, "top.csv")
    expected = tmp_path / "expected.csv"
    table.to_csv(expected, index=False)
    for name in ("predictions/test.csv", "top.csv"):
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name)
        assert Path(path).read_bytes() == expected.read_bytes()


def test_experiments_open_on_their_runs_in_the_ui_and_a_users_choice_stays(local_tracking):
    """ensure_experiment and a stage run in an experiment made elsewhere (as `mlflow run
    --experiment-name` makes it) both carry the tags MLflow's UI reads; a tag a user set is kept."""
    client = mlflow.MlflowClient()
    made = client.get_experiment(ensure_experiment("made-here"))
    assert {k: made.tags.get(k) for k in UI_TAGS} == UI_TAGS
    assert made.tags["mlflow.experimentKind"] == "custom_model_development"
    elsewhere = mlflow.create_experiment("made-elsewhere", tags={UI_TAGS_PRIMARY: "test_recall"})
    assert "mlflow.experimentKind" not in client.get_experiment(elsewhere).tags
    with start_stage_run("made-elsewhere", "probe", experiment_id=elsewhere):
        pass
    tags = client.get_experiment(elsewhere).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags[UI_TAGS_PRIMARY] == "test_recall"


UI_TAGS_PRIMARY = "mlflow.experiment.primaryMetric.name"


def test_ui_links_open_the_model_training_pages_of_the_server_in_use(monkeypatch):
    """MLflow 3.17 picks GenAI or model-training pages from the link (or the browser), not from
    the experiment's tag: every link carries workflowType; a local store's is `make server`'s."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000/")
    assert ui_url("models/m") == "http://10.0.0.5:5000/#/models/m?workflowType=machine_learning"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    assert ui_url("experiments/3/runs", viewStateShareKey="v") == (
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=v"
    )


def test_the_comparison_view_is_stored_as_the_uis_shared_view(local_tracking):
    """The view compare leaves on the searched experiment: finished Target runs, grouped by the
    strategy tag, in the JSON the UI's "Share" button stores (the browser test opens it)."""
    experiment_id = ensure_experiment("compared")
    url = share_comparison_view(experiment_id)
    assert url.endswith(
        f"experiments/{experiment_id}/runs?workflowType=machine_learning&"
        f"viewStateShareKey={COMPARISON_VIEW}"
    )
    tags = mlflow.MlflowClient().get_experiment(experiment_id).tags
    state = json.loads(tags[SHARED_VIEW_PREFIX + COMPARISON_VIEW])
    assert state["searchFilter"] == "tags.stage = 'target' and attributes.status = 'FINISHED'"
    assert state["groupBy"]["groupByKeys"] == [{"mode": "tag", "groupByData": "strategy"}]
    assert "metrics.`test_roc_auc`" in state["selectedColumns"]
    # the filter is one the tracking server accepts
    mlflow.MlflowClient().search_runs([experiment_id], state["searchFilter"])


def test_a_ui_table_is_mlflows_table_json(local_tracking):
    table = pd.DataFrame({"strategy": ["imagenet", "soft"], "roc_auc": [0.8, 0.9]})
    with mlflow.start_run() as run:
        log_ui_table(table, "report/table_iii.json")
    loaded = mlflow.load_table("report/table_iii.json", run_ids=[run.info.run_id])
    assert loaded[["strategy", "roc_auc"]].equals(table)
