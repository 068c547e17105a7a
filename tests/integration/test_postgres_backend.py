"""A PostgreSQL tracking backend for real: the Target entry point logs to it and the run reads
back."""

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_entry_point

pytestmark = pytest.mark.integration


def test_target_run_on_a_postgresql_backend(postgres_uri, data_root, keras_home, tmp_path):
    client = MlflowClient(postgres_uri)
    client.create_experiment("pg", artifact_location=(tmp_path / "artifacts").as_uri())
    result = run_entry_point(
        "target",
        {
            "data_root": data_root,
            "image_size": 32,
            "epochs": 1,
            "n_bootstrap": 50,
            "log_model": "false",
        },
        postgres_uri,
        "pg",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = client.search_runs(
        [client.get_experiment_by_name("pg").experiment_id], "tags.stage = 'target'"
    )
    assert run.info.status == "FINISHED"
    assert run.data.params["n_test"] == "203" and 0 <= run.data.metrics["test_recall"] <= 1
    assert len(client.get_metric_history(run.info.run_id, "epoch_val_accuracy")) == 1
    assert "checkpoints/best.weights.h5" in {
        a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")
    }
