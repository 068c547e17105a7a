"""mstl.tracking on a real embedded store: a data set logged as a run input and read back through
the client."""

import warnings
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from mstl.tracking import (
    UI_TAGS,
    ensure_experiment,
    log_dataset,
    log_table,
    mlflow_false_alarms_silenced,
    start_stage_run,
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
