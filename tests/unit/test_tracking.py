"""mstl.tracking on a real embedded store: a data set logged as a run input and read back through
the client."""

import warnings

import mlflow
import pandas as pd
import pytest

from mstl.tracking import log_dataset, mlflow_false_alarms_silenced


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
    # ways:
    # LocalArtifactDatasetSource, LocalArtifactDatasetSource", and integer columns cannot hold
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
