"""MSTL end to end against a real `mlflow server`: prepare_transition -> transition -> target with
init_from, through `mlflow run`, on the real DICOM sample and on the real 2-D slice folder; the
parent/child link is read back from the server."""

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_entry_point

pytestmark = pytest.mark.integration

TINY = {"image_size": 64, "epochs": 2, "batch_size": 16}


def only_run(client, experiment, stage):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [exp.experiment_id], f"tags.stage = '{stage}'", order_by=["attributes.start_time DESC"]
    )
    assert runs, f"no {stage} run in {experiment}"
    return runs[0]


def run_ok(entry, params, server, experiment):
    result = run_entry_point(entry, params, server, experiment)
    assert result.returncode == 0, f"{entry} failed:\n{result.stderr[-4000:]}"
    return result


@pytest.mark.parametrize("source", ["dicom", "slices"])
def test_prepare_transition_target_chain_nests_target_under_transition(
    source, mlflow_server, data_root, keras_home, tmp_path
):
    experiment = f"mstl-chain-{source}"
    if source == "dicom":
        prepare_params = {
            "dicom_root": data_root / "lung-pet-ct-dx",
            "labels_csv": data_root / "lung-pet-ct-dx" / "slice_labels.csv",
            "label_map": "tumour=1,no_tumour=0",
        }
        group_by = "series"  # the sample is one patient (two reconstructions)
    else:
        prepare_params = {
            "slices_root": data_root / "iq-oth-nccd",
            "label_map": "Malignant cases=1,Bengin cases=0,Normal cases=0",
        }
        group_by = "patient"  # near-duplicate groups
    run_ok(
        "prepare_transition",
        {**prepare_params, "export_dir": tmp_path / "exports"},
        mlflow_server,
        experiment,
    )
    client = MlflowClient(mlflow_server)
    prepared = only_run(client, experiment, "prepare_transition")
    assert prepared.data.params["reused_export"] == "false"
    artifacts = {a.path for a in client.list_artifacts(prepared.info.run_id)}
    assert {"manifest.csv", "skipped.csv", "montages", "slices"} <= artifacts
    manifest = pd.read_csv(
        client.download_artifacts(prepared.info.run_id, "manifest.csv", str(tmp_path))
    )
    assert manifest["label"].nunique() == 2

    run_ok(
        "transition",
        {
            "manifest": prepared.info.run_id,
            "strategy": "hard",
            "group_by": group_by,
            "class_weights": "balanced",
            **TINY,
        },
        mlflow_server,
        experiment,
    )
    transition = only_run(client, experiment, "transition")
    assert (
        transition.data.tags["strategy"] == "hard"
        and transition.data.tags["backbone"] == "mobilenet_025"
    )
    assert int(transition.data.params["n_train"]) + int(transition.data.params["n_val"]) == len(
        manifest
    )
    assert "checkpoints/best.weights.h5" in {
        a.path for a in client.list_artifacts(transition.info.run_id, "checkpoints")
    }
    split = pd.read_csv(
        client.download_artifacts(transition.info.run_id, "data/split.csv", str(tmp_path))
    )
    column = "patient_id" if group_by == "patient" else None
    if column:
        assert (split.groupby(column)["split"].nunique() == 1).all()

    run_ok(
        "target",
        {
            "data_root": data_root,
            "init_from": f"runs:/{transition.info.run_id}",
            "n_bootstrap": 100,
            **TINY,
        },
        mlflow_server,
        experiment,
    )
    target = only_run(client, experiment, "target")
    assert target.info.status == "FINISHED"
    assert target.data.tags["mlflow.parentRunId"] == transition.info.run_id
    assert target.data.tags["strategy"] == "hard"
    assert target.info.experiment_id == transition.info.experiment_id
    children = client.search_runs(
        [transition.info.experiment_id], f"tags.mlflow.parentRunId = '{transition.info.run_id}'"
    )
    assert [c.info.run_id for c in children] == [target.info.run_id]
    assert target.data.params["init_from"] == f"runs:/{transition.info.run_id}"
    assert "test_recall" in target.data.metrics
    # the Transition's model record is the Target's input model; its export is the Transition's data
    # set
    transition_model = client.get_logged_model(transition.data.tags["mstl.model_id"])
    assert transition_model.source_run_id == transition.info.run_id
    assert [m.model_id for m in client.get_run(target.info.run_id).inputs.model_inputs] == [
        transition_model.model_id
    ]
    exports = client.get_run(transition.info.run_id).inputs.dataset_inputs
    assert len(exports) == 1 and exports[0].dataset.name.startswith("transition-export-")


def test_target_refuses_a_transition_of_another_backbone(mlflow_server, data_root):
    client = MlflowClient(mlflow_server)
    transition = only_run(client, "mstl-chain-dicom", "transition")
    result = run_entry_point(
        "target",
        {
            "data_root": data_root,
            "init_from": transition.info.run_id,
            "backbone": "densenet121",
            **TINY,
        },
        mlflow_server,
        "mstl-chain-dicom",
    )
    assert result.returncode != 0
    assert "trained backbone 'mobilenet_025' but backbone='densenet121'" in result.stderr


def test_rerun_of_prepare_reuses_the_export(mlflow_server, data_root, tmp_path):
    params = {"dicom_root": data_root / "lung-pet-ct-dx", "export_dir": tmp_path / "exports"}
    run_ok("prepare_transition", params, mlflow_server, "mstl-reuse")
    run_ok("prepare_transition", params, mlflow_server, "mstl-reuse")
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("mstl-reuse")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.data.params["reused_export"] for r in runs] == ["false", "true"]
    assert runs[0].data.params["export_key"] == runs[1].data.params["export_key"]


def test_manifest_is_downloaded_when_the_export_folder_is_gone(local_tracking, data_root, tmp_path):
    """Another machine (or a cleaned cache): the slices come from the prepare run's artifacts."""
    import shutil

    from mstl.stages.prepare import PrepareParams, run_prepare
    from mstl.stages.transition import load_manifest

    run_id = run_prepare(
        PrepareParams(
            dicom_root=str(data_root / "lung-pet-ct-dx"), export_dir=str(tmp_path / "exports")
        )
    )
    local, folder = load_manifest(run_id)
    assert folder.parent == tmp_path / "exports"
    shutil.rmtree(tmp_path / "exports")
    downloaded, folder = load_manifest(f"runs:/{run_id}")
    assert downloaded.equals(local)
    assert all((folder / f).is_file() for f in downloaded["file"])


def evaluate_on_a_folder_set(client, tracking, experiment, data_root, tmp_path):
    """Both Target models of the experiment through `evaluate` on 24 COVID-CT test slices (another
    set's stand-in)."""
    import os

    import mlflow

    from mstl.stages.evaluate import EvaluateParams, run_evaluate

    folder = tmp_path / "hospital-x"
    for label, name in ((1, "CT_COVID"), (0, "CT_NonCOVID")):
        (folder / str(label)).mkdir(parents=True)
        for f in sorted((data_root / "covid-ct" / name).iterdir())[-12:]:
            os.symlink(f, folder / str(label) / f.name)
    exp = client.get_experiment_by_name(experiment)
    mlflow.set_tracking_uri(tracking)
    evaluated = {}
    for run in client.search_runs(
        [exp.experiment_id], "tags.stage = 'target' and attributes.status = 'FINISHED'"
    ):
        params = EvaluateParams(
            model_uri=f"runs:/{run.info.run_id}",
            images_root=str(folder),
            positive_class="1",
            n_bootstrap=50,
            experiment=experiment,
        )
        evaluated[run.data.tags["strategy"]] = client.get_run(run_evaluate(params))
    return evaluated


def test_compare_reports_mstl_against_its_imagenet_baseline(mlflow_server, data_root, tmp_path):
    """After the DICOM chain (a hard Target run), a baseline on the same split and seed, both
    evaluated on an external folder set, then `-e compare`: Table III, its external columns and the
    paired tests on both sets."""
    experiment = "mstl-chain-dicom"
    run_ok(
        "target", {"data_root": data_root, "n_bootstrap": 100, **TINY}, mlflow_server, experiment
    )
    client = MlflowClient(mlflow_server)
    evaluated = evaluate_on_a_folder_set(client, mlflow_server, experiment, data_root, tmp_path)
    assert sorted(evaluated) == ["hard", "imagenet"]
    run_ok(
        "compare",
        {"search_experiment": experiment, "out_dir": tmp_path / "report"},
        mlflow_server,
        experiment,
    )
    compare = only_run(client, experiment, "compare")
    names = {a.path for a in client.list_artifacts(compare.info.run_id, "report")}
    assert {
        "report/report.md",
        "report/table_iii.csv",
        "report/paired_tests.csv",
        "report/fig5_roc_per_architecture.png",
        "report/fig6_roc_per_strategy.png",
        "report/fig7_confusion_1.png",
    } <= names
    table = pd.read_csv(
        client.download_artifacts(compare.info.run_id, "report/table_iii.csv", str(tmp_path))
    )
    assert sorted(table["strategy"]) == ["hard", "imagenet"]
    assert table["recall_ci"].str.startswith("[").all()
    paired = pd.read_csv(
        client.download_artifacts(compare.info.run_id, "report/paired_tests.csv", str(tmp_path))
    )
    assert sorted(paired["data"].unique()) == ["hospital-x", "test"]
    assert sorted(paired.loc[paired["data"] == "test", "metric"]) == [
        "accuracy",
        "auc",
        "sensitivity",
    ]
    assert paired["p_value"].between(0, 1).all()
    targets = {
        r.data.tags["strategy"]: r
        for r in client.search_runs([compare.info.experiment_id], "tags.stage = 'target'")
    }
    auc = paired[paired["metric"] == "auc"].set_index("data")["difference"]
    assert auc["test"] == pytest.approx(
        targets["hard"].data.metrics["test_roc_auc"]
        - targets["imagenet"].data.metrics["test_roc_auc"],
        abs=1e-9,
    )
    # on the external set the paired difference is that of the two evaluate runs' AUCs
    assert auc["hospital-x"] == pytest.approx(
        evaluated["hard"].data.metrics["roc_auc"] - evaluated["imagenet"].data.metrics["roc_auc"],
        abs=1e-9,
    )
    external = pd.read_csv(
        client.download_artifacts(compare.info.run_id, "report/external.csv", str(tmp_path))
    )
    assert (
        sorted(external["strategy"]) == ["hard", "imagenet"] and (external["n_images"] == 24).all()
    )
    by_strategy = external.set_index("strategy")
    for strategy in ("hard", "imagenet"):
        assert by_strategy.loc[strategy, "roc_auc"] == pytest.approx(
            evaluated[strategy].data.metrics["roc_auc"]
        )
        assert by_strategy.loc[strategy, "evaluate_run_ids"] == evaluated[strategy].info.run_id
    assert compare.data.metrics["n_external_sets"] == 1
    report = (tmp_path / "report" / "report.md").read_text()
    assert "significant at 0.05" in report and "DeLong" in report
    assert "## External validation" in report and "On the external set hospital-x" in report
