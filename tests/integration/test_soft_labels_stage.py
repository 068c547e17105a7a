"""soft_labels end to end against a real `mlflow server`: the real DICOM sample through
prepare_transition, MobileNet-0.25 ImageNet features, nested Optuna trial runs, the labels CSV, and
a soft Transition on it."""

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_entry_point

pytestmark = pytest.mark.integration
EXPERIMENT = "mstl-soft"


@pytest.fixture(scope="module")
def soft_run(mlflow_server, data_root, keras_home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("soft")
    client = MlflowClient(mlflow_server)
    result = run_entry_point(
        "prepare_transition",
        {"dicom_root": data_root / "lung-pet-ct-dx", "export_dir": tmp / "exports"},
        mlflow_server,
        EXPERIMENT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exp = client.get_experiment_by_name(EXPERIMENT)
    prepared = client.search_runs([exp.experiment_id], "tags.stage = 'prepare_transition'")[0]
    result = run_entry_point(
        "soft_labels",
        {
            "manifest": prepared.info.run_id,
            "feature_backbone": "mobilenet_025",
            "image_size": 224,
            "k_values": "2,4,8",
            "folds": 5,
            "cache_dir": tmp / "cache",
        },
        mlflow_server,
        EXPERIMENT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    soft = client.search_runs([exp.experiment_id], "tags.stage = 'soft_labels'")[0]
    return client, prepared, soft, tmp


def test_each_trial_is_a_nested_run_with_k(soft_run):
    client, _, soft, _ = soft_run
    trials = client.search_runs(
        [soft.info.experiment_id], f"tags.mlflow.parentRunId = '{soft.info.run_id}'"
    )
    assert sorted(int(t.data.params["k"]) for t in trials) == [2, 4, 8]
    for trial in trials:
        assert trial.data.params["criterion"] == "silhouette"
        assert len(client.get_metric_history(trial.info.run_id, "fold_score")) == 5
        assert "mean_score" in trial.data.metrics
    best = max(trials, key=lambda t: t.data.metrics["mean_score"])
    assert soft.data.metrics["best_k"] == int(best.data.params["k"])


def test_labels_join_the_manifest_and_pictures_are_logged(soft_run):
    client, prepared, soft, tmp = soft_run
    manifest = pd.read_csv(
        client.download_artifacts(prepared.info.run_id, "manifest.csv", str(tmp))
    )
    labels = pd.read_csv(client.download_artifacts(soft.info.run_id, "labels.csv", str(tmp)))
    joined = manifest.merge(labels, on="file", how="left")
    assert joined["cluster"].notna().all() and len(labels) == len(manifest)
    assert labels["cluster"].nunique() == int(soft.data.metrics["best_k"])
    paths = {a.path for a in client.list_artifacts(soft.info.run_id)} | {
        a.path
        for folder in ("plots", "montages", "features")
        for a in client.list_artifacts(soft.info.run_id, folder)
    }
    assert "plots/criterion_vs_k.png" in paths and "cluster_sizes.csv" in paths
    assert sum(p.startswith("montages/cluster_") for p in paths) == int(soft.data.metrics["best_k"])
    assert any(p.startswith("features/") and p.endswith(".npy") for p in paths)
    assert soft.data.params["feature_dim"] == str(7 * 7 * 256)


def test_soft_transition_trains_on_the_labels(soft_run, mlflow_server):
    client, prepared, soft, _ = soft_run
    result = run_entry_point(
        "transition",
        {
            "manifest": prepared.info.run_id,
            "strategy": "soft",
            "labels": soft.info.run_id,
            "group_by": "series",
            "image_size": 64,
            "epochs": 1,
            "batch_size": 16,
        },
        mlflow_server,
        EXPERIMENT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = client.search_runs([exp.experiment_id], "tags.stage = 'transition'")[0]
    assert run.info.status == "FINISHED" and run.data.tags["strategy"] == "soft"
    assert run.data.params["output"] == "categorical"
    assert run.data.params["n_classes"] == str(int(soft.data.metrics["best_k"]))


def test_rerun_reuses_the_features(soft_run, mlflow_server):
    client, prepared, _, tmp = soft_run
    result = run_entry_point(
        "soft_labels",
        {
            "manifest": prepared.info.run_id,
            "feature_backbone": "mobilenet_025",
            "image_size": 224,
            "k_values": "2,4,8",
            "folds": 5,
            "criterion": "inertia",
            "cache_dir": tmp / "cache",
            "log_features": "false",
        },
        mlflow_server,
        EXPERIMENT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exp = client.get_experiment_by_name(EXPERIMENT)
    rerun = client.search_runs(
        [exp.experiment_id], "tags.stage = 'soft_labels'", order_by=["attributes.start_time DESC"]
    )[0]
    assert rerun.data.params["features_reused"] == "true"
    assert (
        rerun.data.metrics["best_k"] == 8
    )  # the paper's criterion takes the largest k on the grid
