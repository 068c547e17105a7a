"""The metric keys each stage logs, pinned by name: runs logged before and after a change must still
line up in the MLflow UI's compare view. The lists are written out here, not read from
``mstl.evaluation.metrics``, so renaming a metric there fails this test."""

from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest

from mstl.evaluation import external
from mstl.evaluation.champion import version_metric_tags
from mstl.evaluation.grid_stats import comparisons, grid_counts
from mstl.stages import evaluate as evaluate_stage
from mstl.stages import target as target_stage
from mstl.stages.promote import version_tags

CI = ("", "_ci_low", "_ci_high")
PAPER = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")
CLINICAL = ("roc_auc", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy", "brier", "ece")
PROBES = ("lung_attention", "masked_lung_auc", "lung_field_found")

TARGET_KEYS = sorted(
    [f"{split}_{name}{ci}" for split in ("val", "test") for name in PAPER for ci in CI]
    + [f"test_{probe}" for probe in PROBES]
)
EVALUATE_KEYS = sorted(
    [f"{name}{ci}" for name in CLINICAL for ci in CI]
    + ["sensitivity_at_0.5", "specificity_at_0.5", *PROBES]
    + [f"patient_{name}{ci}" for name in CLINICAL for ci in CI]
    + ["n_patients"]
)
EVALUATE_PARAMS = sorted(
    [
        "model_uri",
        "images_root",
        "positive_class",
        "labels_csv",
        "patient_pattern",
        "data_name",
        "threshold",
        "n_bootstrap",
        "skip_unreadable",
        "seed",
        "used_threshold",
        "n_images",
        "n_positive",
        "n_skipped",
        "ci_method",
        "n_patients_positive",
        "n_patients_negative",
    ]
)


def scores(n=40):
    """Labels of both classes and probabilities with every ratio defined at 0.5."""
    y = np.arange(n) % 2
    return y, np.clip(0.25 + 0.5 * y + np.linspace(-0.2, 0.2, n), 0, 1)


def fake_probes(*args, **kwargs):
    return dict.fromkeys(PROBES, 0.5)


def test_target_logs_the_papers_metrics_per_split_with_intervals_and_the_probes(
    local_tracking, monkeypatch
):
    y, p = scores()
    monkeypatch.setattr(target_stage, "predict_grey", lambda *a: p[:, None])
    monkeypatch.setattr(target_stage, "GradCam", lambda model: None)
    monkeypatch.setattr(target_stage, "log_explanations", lambda *a: None)
    monkeypatch.setattr(target_stage, "shortcut_probes", fake_probes)
    table = pd.DataFrame(
        {"file": [f"f{i}.png" for i in range(len(y))], "patient_id": "", "label": y}
    )
    params = target_stage.TargetParams(n_bootstrap=5)
    spec = SimpleNamespace(preprocess_input=None)
    grey = np.zeros((len(y), 8, 8), np.uint8)
    with mlflow.start_run() as run:
        for split in ("val", "test"):
            target_stage.evaluate_split(None, grey, table, spec, params, split, "imagenet")
    logged = mlflow.MlflowClient(local_tracking).get_run(run.info.run_id).data.metrics
    assert sorted(logged) == TARGET_KEYS


def test_evaluate_logs_the_clinical_metrics_per_image_and_patient(
    local_tracking, monkeypatch, tmp_path
):
    y, p = scores()
    csv = tmp_path / "labels.csv"
    patients = [f"p{i % 2}-{i // 8}" for i in range(len(y))]  # 5 patients of each class
    paths = [f"{i}.png" for i in range(len(y))]
    pd.DataFrame({"path": paths, "label": y, "patient_id": patients}).to_csv(csv, index=False)
    classifier = SimpleNamespace(
        config={"backbone": "mobilenet_025", "threshold": 0.5},
        model=None,
        preprocess_input=None,
        predict_grey=lambda grey: p,
    )
    monkeypatch.setattr(evaluate_stage, "load_classifier", lambda uri: (classifier, None, uri))
    hashes = [f"{i:064x}" for i in range(len(y))]
    monkeypatch.setattr(
        evaluate_stage,
        "decode_set",
        lambda table, config, skip: (
            np.zeros((len(y), 8, 8), np.uint8),
            hashes,
            list(range(len(y))),
            [],
        ),
    )
    monkeypatch.setattr(evaluate_stage, "GradCam", lambda model: None)
    monkeypatch.setattr(evaluate_stage, "shortcut_probes", fake_probes)
    monkeypatch.setattr(evaluate_stage, "error_sheet", lambda *a, **k: None)
    run_id = evaluate_stage.run_evaluate(
        evaluate_stage.EvaluateParams(
            model_uri="runs:/0123/classifier", labels_csv=str(csv), n_bootstrap=5
        )
    )
    client = mlflow.MlflowClient(local_tracking)
    run = client.get_run(run_id)
    assert sorted(run.data.metrics) == EVALUATE_KEYS
    assert sorted(run.data.params) == EVALUATE_PARAMS
    assert run.data.params["ci_method"] == run.data.tags["ci_method"] == "patient_cluster_bootstrap"
    assert "5 positive and 5 negative patient" in run.data.tags["ci_warning"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    artifacts |= {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"predictions.csv", "patients.csv", "plots/patients.png"} <= artifacts


def test_evaluate_tags_a_registered_version_with_the_headline_figures():
    values = external.set_metrics(*scores(), 0.5, 5, 0)
    tags = external.version_tags("hospital-a", values, "ab" * 32, "run-1")
    assert list(tags) == [
        "external.hospital-a.roc_auc",
        "external.hospital-a.sensitivity",
        "external.hospital-a.specificity",
        "external.hospital-a.digest",
        "external.hospital-a.run_id",
    ]
    assert tags["external.hospital-a.digest"] == "ab" * 8


def test_promote_tags_the_version_with_the_test_metrics_and_the_selection_metrics():
    metrics = {
        f"{split}_{name}{ci}": 0.5 for split in ("val", "test") for name in PAPER for ci in CI
    }
    run = SimpleNamespace(
        info=SimpleNamespace(run_id="r1"),
        data=SimpleNamespace(
            metrics=metrics,
            params={"threshold": "0.5", "data_sha256": "d" * 64, "split_sha256": "s" * 64},
            tags={},
        ),
    )
    assert sorted(version_tags(run, "val")) == sorted(
        ["source_run_id", "selected_on", "threshold", "backbone", "strategy", "split"]
        + ["parent_run_id", "val_recall", "val_roc_auc", "data_sha256", "split_sha256"]
        + [f"test_{name}" for name in PAPER]
    )
    assert version_metric_tags({"test_recall": 0.91234}, "val") == {"test_recall": "0.9123"}


def test_compare_logs_its_counts():
    from tests.unit.test_report import grid

    runs = grid()
    assert sorted(grid_counts(runs, comparisons(runs), pd.DataFrame())) == [
        "n_external_sets",
        "n_significant",
        "n_significant_holm",
        "n_target_runs",
    ]


@pytest.mark.parametrize("patients", [None, [""] * 40])
def test_without_patients_no_patient_keys(patients):
    values = external.set_metrics(*scores(), 0.5, 5, 0, patients)
    assert not [k for k in values if k.startswith("patient_") or k == "n_patients"]


def test_the_shortcut_probes_are_named_as_both_stages_log_them():
    from mstl.evaluation.probes import shortcut_probes
    from mstl.models import build_classifier, get_backbone
    from mstl.training.fit import set_seed

    set_seed(0)
    model = build_classifier("mobilenet_025", weights=None, image_size=32)
    grey = np.random.default_rng(0).integers(0, 255, (6, 32, 32)).astype(np.uint8)
    preprocess = get_backbone("mobilenet_025").preprocess_input
    assert list(shortcut_probes(model, grey, np.arange(6) % 2, preprocess)) == list(PROBES)
