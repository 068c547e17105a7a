"""The Target entry point end to end: `mlflow run . -e target` against a real `mlflow server`, on
the real COVID-CT and the genuine MobileNet-0.25 ImageNet weights, read back through the client."""

import hashlib
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mstl.data.images import ImageReadError
from mstl.inference.pyfunc import serving_requirements
from mstl.stages.target import TargetParams, run_target
from tests.conftest import copy_or_link_tree, run_entry_point

pytestmark = pytest.mark.integration

TINY = {"image_size": 64, "epochs": 2, "n_bootstrap": 200, "batch_size": 32}
# the anti-shortcut preprocessing is on here, so that the tests below which reproduce the Target
# run's probabilities through the served model, `evaluate` and `explain` show it is applied the same
# everywhere
PREPROCESSING = {"lung_crop": "true", "intensity": "clahe"}
# the trained model is also evaluated on the external development set, nested under the Target run
EXTERNAL_PATIENTS = "ctmd_[a-z]+_([^_]+)_s"


@pytest.fixture(scope="module")
def target_run(mlflow_server, data_root, keras_home):
    external = {
        "external_sets": data_root / "covid-ct-md",
        "external_patient_pattern": EXTERNAL_PATIENTS,
    }
    result = run_entry_point(
        "target",
        {"data_root": data_root, "backbone": "mobilenet_025", **TINY, **PREPROCESSING, **external},
        mlflow_server,
        "target-it",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("target-it")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'target'")
    assert len(runs) == 1
    return client, runs[0], result


def test_run_is_finished_with_the_papers_tags_and_params(target_run):
    _, run, _ = target_run
    assert run.info.status == "FINISHED"
    assert run.data.tags["backbone"] == "mobilenet_025"
    assert run.data.tags["strategy"] == "imagenet"
    assert run.data.tags["split"] == "official"
    p = run.data.params
    assert p["image_size"] == "64" and p["epochs"] == "2" and p["weights"] == "imagenet"
    assert (p["n_train"], p["n_val"], p["n_test"]) == ("425", "118", "203")
    assert len(p["split_sha256"]) == 64 and len(p["data_sha256"]) == 64
    assert p["cached_frozen"] == "true"
    assert (p["lung_crop"], p["intensity"]) == ("true", "clahe")
    missing = [
        run.data.metrics[f"n_lung_field_missing_{part}"] for part in ("train", "val", "test")
    ]
    assert all(
        0 <= n <= 0.1 * int(p[f"n_{part}"])
        for n, part in zip(missing, ("train", "val", "test"), strict=True)
    )


def test_the_model_is_evaluated_on_the_external_set_in_a_run_nested_under_the_target(
    target_run, tmp_path
):
    client, run, _ = target_run
    (ev,) = client.search_runs(
        [run.info.experiment_id],
        f"tags.stage = 'evaluate' and tags.`mlflow.parentRunId` = '{run.info.run_id}'",
    )
    assert ev.info.status == "FINISHED" and ev.data.tags["data_name"] == "covid-ct-md"
    assert ev.data.metrics["n_patients"] == 6 and 0 <= ev.data.metrics["roc_auc"] <= 1
    assert ev.data.params["patient_pattern"] == EXTERNAL_PATIENTS
    patients = pd.read_csv(client.download_artifacts(ev.info.run_id, "patients.csv", str(tmp_path)))
    assert set(patients["patient_id"]) >= {"P001", "P002", "normal001"}


def test_a_missing_external_set_fails_before_training(mlflow_server, data_root, tmp_path):
    result = run_entry_point(
        "target",
        {"data_root": data_root, **TINY, "external_sets": tmp_path / "no-such-hospital"},
        mlflow_server,
        "target-it-missing",
    )
    assert result.returncode != 0
    assert f"external set {tmp_path / 'no-such-hospital'} not found" in result.stderr
    assert "Epoch 1/" not in result.stdout + result.stderr


def test_per_epoch_history_and_test_metrics_with_intervals(target_run):
    client, run, result = target_run
    for name in (
        "epoch_train_loss",
        "epoch_train_accuracy",
        "epoch_val_loss",
        "epoch_val_accuracy",
    ):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [0, 1], name
    assert (
        "Epoch 2/2" in result.stdout + result.stderr
    )  # one line per epoch for the person watching
    m = run.data.metrics
    for name in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc"):
        if (
            f"test_{name}" not in m
        ):  # undefined, so not logged: only precision, when nothing is called positive
            assert name == "precision" and m["test_recall"] == 0
            continue
        assert m[f"test_{name}_ci_low"] <= m[f"test_{name}"] <= m[f"test_{name}_ci_high"], name
    assert 0 <= m["best_epoch"] <= 1 and m["epochs_run"] == 2  # patience 0: every epoch
    assert m["val_accuracy"] == pytest.approx(
        m["best_val_accuracy"]
    )  # the kept weights are the best epoch's


def test_artifacts_checkpoint_roc_predictions_and_split(target_run, tmp_path):
    client, run, _ = target_run
    run_id = run.info.run_id
    paths = {
        a.path
        for folder in ("checkpoints", "plots", "predictions", "data", "explanations")
        for a in client.list_artifacts(run_id, folder)
    }
    assert (
        "checkpoints/best.weights.h5" not in paths
    )  # the weights are stored once, in the logged model
    assert {
        "plots/roc_test.png",
        "plots/confusion_test.png",
        "predictions/test.csv",
        "data/split.csv",
        "explanations/gradcam_test.png",
    } <= paths
    roc = client.download_artifacts(run_id, "plots/roc_test.png", str(tmp_path))
    assert Path(roc).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    predictions = pd.read_csv(
        client.download_artifacts(run_id, "predictions/test.csv", str(tmp_path))
    )
    assert list(predictions.columns) == ["file", "patient_id", "label", "probability"]
    assert len(predictions) == 203 and predictions["probability"].between(0, 1).all()
    split = pd.read_csv(client.download_artifacts(run_id, "data/split.csv", str(tmp_path)))
    assert split["split"].value_counts().to_dict() == {"train": 425, "test": 203, "val": 118}
    # the logged recall is the recall of the logged predictions
    recall = ((predictions["probability"] >= 0.5) & (predictions["label"] == 1)).sum() / (
        predictions["label"] == 1
    ).sum()
    assert recall == pytest.approx(run.data.metrics["test_recall"])


def test_one_logged_model_from_code_reproduces_the_logged_predictions(
    target_run, mlflow_server, data_root, tmp_path
):
    import base64

    client, run, _ = target_run
    mlflow.set_tracking_uri(mlflow_server)
    models = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    assert [m.name for m in models] == ["classifier"]  # one logged model per Target run
    assert run.data.tags["mstl.model_id"] == models[0].model_id
    linked = {m.key: m.value for m in models[0].metrics}
    assert linked["test_recall"] == pytest.approx(
        run.data.metrics["test_recall"]
    )  # metrics linked to the model
    local = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{models[0].model_id}", dst_path=str(tmp_path / "m")
        )
    )
    assert "serve.py" in (local / "MLmodel").read_text()  # models from code: nothing pickled
    assert not list(local.rglob("*.pkl"))
    # its environment: the installation's own pinned dependencies, DICOM reading included, not mstl
    # (code)
    requirements = (local / "requirements.txt").read_text().split()
    assert requirements == serving_requirements() and any(
        r.startswith("pydicom==") for r in requirements
    )

    predictions = pd.read_csv(
        client.download_artifacts(run.info.run_id, "predictions/test.csv", str(tmp_path))
    ).head(4)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/classifier")
    root = data_root / "covid-ct"
    request = pd.DataFrame(
        {
            "image": [
                base64.b64encode((root / name).read_bytes()).decode()
                for name in predictions["file"]
            ]
        }
    )
    served = model.predict(request)["probability"].to_numpy()
    np.testing.assert_allclose(served, predictions["probability"].to_numpy(), atol=1e-5)


def test_the_split_files_are_the_runs_data_sets(target_run):
    client, run, _ = target_run
    full = client.get_run(run.info.run_id)
    inputs = {d.dataset.name: d for d in full.inputs.dataset_inputs}
    assert sorted(inputs) == [
        "covid-ct-official-test",
        "covid-ct-official-train",
        "covid-ct-official-val",
    ]
    contexts = {
        name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in inputs.items()
    }
    assert contexts == {
        "covid-ct-official-train": "training",
        "covid-ct-official-val": "validation",
        "covid-ct-official-test": "test",
    }
    assert all(len(d.dataset.digest) == 16 for d in inputs.values())
    assert len({d.dataset.digest for d in inputs.values()}) == 3


def test_entry_point_names_an_unknown_backbone(mlflow_server, data_root):
    result = run_entry_point(
        "target", {"data_root": data_root, "backbone": "alexnet"}, mlflow_server, "target-bad"
    )
    assert result.returncode != 0
    assert "'alexnet'" in result.stderr


def test_unreadable_image_fails_by_name_or_is_skipped_and_logged(
    data_root, keras_home, local_tracking, tmp_path
):
    root = tmp_path / "data"
    copy_or_link_tree(data_root / "covid-ct", root / "covid-ct")
    victim = sorted((root / "covid-ct" / "CT_COVID").iterdir())[5]
    os.unlink(victim)
    victim.write_bytes(b"")
    params = dict(data_root=str(root), image_size=32, epochs=1, n_bootstrap=50, log_model=False)
    with pytest.raises(ImageReadError, match=victim.name):
        run_target(TargetParams(**params))
    mlflow.end_run()
    run_id = run_target(TargetParams(**params, skip_unreadable=True))
    run = MlflowClient(local_tracking).get_run(run_id)
    assert run.data.params["n_unreadable"] == "1"
    table = pd.read_csv(
        MlflowClient(local_tracking).download_artifacts(
            run_id, "data/unreadable.csv", str(tmp_path)
        )
    )
    assert table["path"].str.endswith(victim.name).tolist() == [True]
    assert (
        int(run.data.params["n_train"])
        + int(run.data.params["n_val"])
        + int(run.data.params["n_test"])
        == 745
    )
    artifacts = {a.path for a in MlflowClient(local_tracking).list_artifacts(run_id, "checkpoints")}
    assert artifacts == {
        "checkpoints/best.weights.h5"
    }  # without a logged model the weights are a checkpoint


def post_images(url: str, payloads: list[bytes | str]):
    import base64
    import json
    import urllib.error
    import urllib.request

    rows = [[p if isinstance(p, str) else base64.b64encode(p).decode()] for p in payloads]
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
    request = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def champion(target_run, mlflow_server):
    """`mlflow run . -e promote` twice: the alias moves to the new version, the old one stays."""
    client, run, _ = target_run
    for _ in range(2):
        result = run_entry_point(
            "promote",
            {"search_experiment": "target-it", "model_name": "it-covid-ct"},
            mlflow_server,
            "target-it",
        )
        assert result.returncode == 0, result.stderr[-3000:]
    return client.get_model_version_by_alias("it-covid-ct", "champion")


def test_promotion_registers_the_most_sensitive_run_with_its_figures(champion, target_run):
    client, run, _ = target_run
    assert champion.version == "2"
    assert [v.version for v in client.search_model_versions("name = 'it-covid-ct'")] and sorted(
        v.version for v in client.search_model_versions("name = 'it-covid-ct'")
    ) == ["1", "2"]
    tags = champion.tags
    assert tags["source_run_id"] == run.info.run_id and tags["selected_on"] == "val"
    assert (
        tags["backbone"] == "mobilenet_025"
        and tags["strategy"] == "imagenet"
        and tags["split"] == "official"
    )
    assert float(tags["test_recall"]) == pytest.approx(run.data.metrics["test_recall"], abs=1e-4)
    assert tags["threshold"] == "0.5"
    assert "recall" in champion.description


def test_served_model_answers_ct_images_and_dicom_and_refuses_bad_requests(
    target_run, champion, mlflow_server, data_root, tmp_path
):
    import subprocess
    import time
    import urllib.request

    from tests.conftest import VENV_BIN, free_port
    from tests.dicom_factory import write_slice

    _, run, _ = target_run
    port = free_port()
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=mlflow_server,
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    )
    server = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/it-covid-ct@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (
                    "model server did not start"
                )
                time.sleep(1)
        png = sorted((data_root / "covid-ct" / "CT_COVID").iterdir())[0]
        dicom = next((data_root / "lung-pet-ct-dx").rglob("1-15.dcm"))
        status, body = post_images(url, [png.read_bytes(), dicom.read_bytes()])
        assert status == 200, body
        answers = body["predictions"]
        assert len(answers) == 2
        for answer in answers:
            assert 0 <= answer["probability"] <= 1 and answer["label"] == int(
                answer["probability"] >= 0.5
            )

        # the served probability is the model's on the training preprocessing
        from mstl.data.images import open_grey
        from mstl.data.pipeline import grey_to_input
        from mstl.data.preprocessing import Preprocessing
        from mstl.inference.predict import apply_temperature
        from mstl.models import get_backbone

        mlflow.set_tracking_uri(mlflow_server)
        served = mlflow.pyfunc.load_model(
            f"runs:/{run.info.run_id}/classifier"
        ).unwrap_python_model()
        grey = Preprocessing(64, lung_crop=True, intensity="clahe")(open_grey(png))
        x = grey_to_input(grey[None], get_backbone("mobilenet_025").preprocess_input)
        raw = float(served.model(x, training=False)[0, 0])
        # through the temperature fitted on validation and stored with the model
        temperature = served.temperatures[0]
        assert temperature == pytest.approx(run.data.metrics["temperature"], rel=1e-6)
        assert answers[0]["probability"] == pytest.approx(
            float(apply_temperature(raw, temperature)), abs=1e-5
        )

        mr = write_slice(
            tmp_path / "mr.dcm", "1.2.3", z=0.0, instance=1, modality="MR"
        ).read_bytes()
        for bad, reason in (
            (b"not an image", "cannot read image"),
            (b"", "empty image"),
            (mr, "modality MR is not CT"),
            ("%%%", "base64"),
        ):
            status, body = post_images(url, [bad])
            assert 400 <= status < 500, (reason, status, body)
            assert reason in body.get("message", ""), body
        status, body = post_images(url, [png.read_bytes()])  # still serving
        assert status == 200 and body["predictions"][0]["probability"] == pytest.approx(
            answers[0]["probability"], abs=1e-6
        )
    finally:
        server.terminate()
        server.wait(20)


def test_explain_overlays_an_image_and_a_dicom_slice_for_the_champion(
    champion, mlflow_server, data_root, tmp_path
):
    png = sorted((data_root / "covid-ct" / "CT_NonCOVID").iterdir())[0]
    dicom = next((data_root / "lung-pet-ct-dx").rglob("1-15.dcm"))
    result = run_entry_point(
        "explain",
        {"model_uri": "models:/it-covid-ct@champion", "images": f"{png},{dicom}"},
        mlflow_server,
        "target-it",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("target-it")
    run = client.search_runs([exp.experiment_id], "tags.stage = 'explain'")[0]
    names = sorted(a.path for a in client.list_artifacts(run.info.run_id, "explanations"))
    assert len(names) == 3 and "explanations/sheet.png" in names
    sheet = client.download_artifacts(run.info.run_id, "explanations/sheet.png", str(tmp_path))
    assert Path(sheet).read_bytes()[:4] == b"\x89PNG"


def evaluate_run(client, result, experiment="target-it"):
    assert result.returncode == 0, result.stderr[-3000:]
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs(
        [exp.experiment_id], "tags.stage = 'evaluate'", order_by=["attributes.start_time DESC"]
    )[0]


def test_target_logs_the_shortcut_probes(target_run):
    _, run, _ = target_run
    m = run.data.metrics
    assert 0 <= m["test_lung_attention"] <= 1 and 0 <= m["test_masked_lung_auc"] <= 1
    assert (
        m["test_lung_field_found"] > 0.9
    )  # the 8-bit lung field is found in nearly every COVID-CT test slice


def test_evaluate_a_registered_model_on_a_folder_set(
    champion, target_run, mlflow_server, data_root, tmp_path
):
    client, run, _ = target_run
    test = pd.read_csv(
        client.download_artifacts(run.info.run_id, "predictions/test.csv", str(tmp_path))
    )
    picked = pd.concat([test[test["label"] == 1].head(15), test[test["label"] == 0].head(15)])
    for file, label in zip(picked["file"], picked["label"], strict=True):
        target = tmp_path / "hospital" / ("covid" if label else "normal") / Path(file).name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(data_root / "covid-ct" / file, target)
    result = run_entry_point(
        "evaluate",
        {
            "model_uri": "models:/it-covid-ct@champion",
            "images_root": tmp_path / "hospital",
            "positive_class": "covid",
            "data_name": "hospital-a",
            "n_bootstrap": 100,
        },
        mlflow_server,
        "target-it",
    )
    ev = evaluate_run(client, result)
    m = ev.data.metrics
    predictions = pd.read_csv(
        client.download_artifacts(ev.info.run_id, "predictions.csv", str(tmp_path))
    )
    assert list(predictions.columns) == [
        "file",
        "patient_id",
        "sha256",
        "label",
        "probability",
        "predicted",
        "outcome",
    ]  # each file named (relative to the root), so a user finds the slices the model missed
    assert len(predictions) == 30
    # the served model on these files gives the Target run's own test probabilities
    merged = picked.assign(
        sha256=[
            hashlib.sha256((data_root / "covid-ct" / f).read_bytes()).hexdigest()
            for f in picked["file"]
        ]
    )
    joined = merged.merge(predictions, on="sha256", suffixes=("_target", ""))
    np.testing.assert_allclose(joined["probability"], joined["probability_target"], atol=1e-5)
    # every metric equals the one recomputed from the logged predictions
    y, p = predictions["label"].to_numpy(), predictions["probability"].to_numpy()
    from sklearn.metrics import roc_auc_score

    from mstl.evaluation.calibration import brier_score, expected_calibration_error

    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["sensitivity"] == pytest.approx(((p >= 0.5) & (y == 1)).sum() / (y == 1).sum())
    assert m["specificity"] == pytest.approx(((p < 0.5) & (y == 0)).sum() / (y == 0).sum())
    assert m["brier"] == pytest.approx(brier_score(y, p)) and m["ece"] == pytest.approx(
        expected_calibration_error(y, p)
    )
    assert m["roc_auc_ci_low"] <= m["roc_auc"] <= m["roc_auc_ci_high"]
    assert "masked_lung_auc" in m and "lung_attention" in m
    # the data set is the run's input; the metrics are linked to the evaluated logged model
    inputs = client.get_run(ev.info.run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [
        ("hospital-a", ev.data.tags["data_digest"])
    ]
    model_id = ev.data.tags["mstl.evaluated_model_id"]
    assert model_id == run.data.tags["mstl.model_id"]  # the champion's logged model
    linked = {
        x.key: x.value
        for x in client.get_logged_model(model_id).metrics
        if x.dataset_name == "hospital-a"
    }
    assert linked["roc_auc"] == pytest.approx(m["roc_auc"])
    # the registered version carries the external figures
    tags = client.get_model_version("it-covid-ct", champion.version).tags
    assert float(tags["external.hospital-a.roc_auc"]) == pytest.approx(m["roc_auc"], abs=1e-4)
    assert tags["external.hospital-a.digest"] == ev.data.tags["data_digest"]
    plots = {a.path for a in client.list_artifacts(ev.info.run_id, "plots")}
    assert plots == {
        "plots/roc.png",
        "plots/confusion.png",
        "plots/reliability.png",
        "plots/score_histogram.png",
    }


def test_evaluate_a_csv_set_with_patients_and_dicom_slices(
    target_run, mlflow_server, data_root, tmp_path
):
    client, run, _ = target_run
    split = pd.read_csv(
        client.download_artifacts(run.info.run_id, "data/split.csv", str(tmp_path)), dtype=str
    )
    test = split[split["split"] == "test"].groupby("label").head(20)  # both classes
    pd.DataFrame(
        {
            "path": [str(data_root / "covid-ct" / f) for f in test["file"]],
            "label": test["label"],
            "patient_id": test["patient_id"],
        }
    ).to_csv(tmp_path / "labels.csv", index=False)
    ev = evaluate_run(
        client,
        run_entry_point(
            "evaluate",
            {
                "model_uri": f"runs:/{run.info.run_id}",
                "labels_csv": tmp_path / "labels.csv",
                "n_bootstrap": 50,
            },
            mlflow_server,
            "target-it",
        ),
    )
    assert ev.data.metrics["n_patients"] == test["patient_id"].nunique()
    assert "patient_sensitivity" in ev.data.metrics

    # Lung-PET-CT-Dx DICOM slices (tumour vs none: another task, the same mechanics) through the
    # lung window
    index = pd.read_csv(data_root / "lung-pet-ct-dx" / "slice_index.csv")
    dicom = pd.DataFrame(
        {
            "path": [str(data_root / "lung-pet-ct-dx" / f) for f in index["file"]],
            "label": (index["label"] == "tumour").astype(int),
            "patient_id": index["patient_id"],
        }
    )
    dicom.to_csv(tmp_path / "dicom.csv", index=False)
    ev = evaluate_run(
        client,
        run_entry_point(
            "evaluate",
            {
                "model_uri": f"runs:/{run.info.run_id}/classifier",
                "labels_csv": tmp_path / "dicom.csv",
                "data_name": "lung-dx",
                "n_bootstrap": 50,
            },
            mlflow_server,
            "target-it",
        ),
    )
    assert ev.data.params["n_images"] == str(len(dicom)) and ev.data.params["n_skipped"] == "0"
    assert (
        ev.data.metrics["n_patients"] == 1
    )  # one patient: patient-level AUC undefined, sensitivity logged
    assert "patient_roc_auc" not in ev.data.metrics and "patient_sensitivity" in ev.data.metrics


def test_evaluate_names_a_model_uri_that_does_not_resolve(mlflow_server, data_root, tmp_path):
    (tmp_path / "covid").mkdir()
    png = sorted((data_root / "covid-ct" / "CT_COVID").iterdir())[0]
    (tmp_path / "covid" / "a.png").write_bytes(
        png.read_bytes()
    )  # a usable set: only the model is wrong
    result = run_entry_point(
        "evaluate",
        {
            "model_uri": "models:/no-such-model/7",
            "images_root": tmp_path,
            "positive_class": "covid",
        },
        mlflow_server,
        "target-it",
    )
    assert result.returncode != 0 and "models:/no-such-model/7" in result.stderr


def test_promote_gate_refuses_below_min_external_auc_and_accepts_above(
    champion, target_run, mlflow_server, data_root, tmp_path
):
    client, run, _ = target_run
    split = pd.read_csv(
        client.download_artifacts(run.info.run_id, "data/split.csv", str(tmp_path)), dtype=str
    )
    test = split[split["split"] == "test"].groupby("label").head(20)  # both classes
    pd.DataFrame(
        {"path": [str(data_root / "covid-ct" / f) for f in test["file"]], "label": test["label"]}
    ).to_csv(tmp_path / "external.csv", index=False)
    common = {
        "search_experiment": "target-it",
        "model_name": "it-covid-ct",
        "external_csv": tmp_path / "external.csv",
    }
    before = client.get_model_version_by_alias("it-covid-ct", "champion").version
    refused = run_entry_point(
        "promote", {**common, "min_external_auc": 0.999}, mlflow_server, "target-it"
    )
    assert refused.returncode != 0 and "below min_external_auc=0.999" in refused.stderr
    assert (
        client.get_model_version_by_alias("it-covid-ct", "champion").version == before
    )  # the alias did not move
    newest = max(int(v.version) for v in client.search_model_versions("name = 'it-covid-ct'"))
    latest = client.get_model_version("it-covid-ct", str(newest))
    auc = float(latest.tags["external.external.roc_auc"])
    assert "External set external" in latest.description
    accepted = run_entry_point(
        "promote", {**common, "min_external_auc": round(auc - 0.001, 4)}, mlflow_server, "target-it"
    )
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    moved = client.get_model_version_by_alias("it-covid-ct", "champion")
    assert (
        int(moved.version) == int(latest.version) + 1
        and float(moved.tags["external.external.roc_auc"]) == auc
    )
