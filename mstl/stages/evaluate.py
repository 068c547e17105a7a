"""The `evaluate` stage: score any logged or registered model on any labelled CT image set, through
exactly
the served model's preprocessing, and track it: metrics with CIs (discrimination and calibration),
the
shortcut probes, pictures, predictions by content hash, the data set as a run input and the metrics
linked
to the logged model. A registered version is tagged with its external figures.

Patient-level metrics (with ``patient_id``): a patient's score is the mean of their slices'
probabilities
and their label the maximum of their slices' labels (a patient with any COVID slice is a COVID
patient).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from mstl import defaults
from mstl.data.covid_ct import combined_sha256
from mstl.data.labelled import labelled_files
from mstl.evaluation.calibration import (
    brier_score,
    expected_calibration_error,
    reliability_figure,
    score_histogram_figure,
)
from mstl.evaluation.gradcam import GradCam, error_sheet
from mstl.evaluation.metrics import bootstrap, point_metrics
from mstl.evaluation.plots import confusion_figure, roc_figure
from mstl.evaluation.probes import shortcut_probes
from mstl.inference.pyfunc import decode_set, load_classifier, model_version
from mstl.tracking import (
    log_dataset,
    log_figure,
    log_params,
    log_table,
    start_stage_run,
    tracking_uri,
)

EXTERNAL_METRICS = (
    "roc_auc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "accuracy",
    "brier",
    "ece",
)


def external_metrics(y, p, threshold: float) -> dict[str, float]:
    """Discrimination at ``threshold`` and calibration; sensitivity is recall, PPV precision."""
    m = point_metrics(y, p, threshold)
    return {
        "roc_auc": m["roc_auc"],
        "sensitivity": m["recall"],
        "specificity": m["specificity"],
        "ppv": m["precision"],
        "npv": negative_predictive_value(y, p, threshold),
        "f1": m["f1"],
        "accuracy": m["accuracy"],
        "brier": brier_score(y, p),
        "ece": expected_calibration_error(y, p),
    }


@dataclass(frozen=True)
class EvaluateParams:
    """Parameters of `-e evaluate`."""

    model_uri: str = "models:/mstl-covid-ct@champion"
    images_root: str = ""  # one sub-folder per class
    positive_class: str = ""  # the sub-folder holding the positive (COVID) images
    labels_csv: str = ""  # or: path,label[,patient_id] (paths relative to the CSV's folder)
    data_name: str = ""
    threshold: float = 0.0  # 0: the model's own stored threshold (0.5 is always reported too)
    n_bootstrap: int = defaults.N_BOOTSTRAP
    skip_unreadable: bool = False
    seed: int = defaults.SEED
    experiment: str = defaults.EXPERIMENT_NAME

    def validate(self) -> None:
        if bool(self.images_root) == bool(self.labels_csv):
            raise ValueError("give either images_root (with positive_class) or labels_csv")
        if self.images_root and not self.positive_class:
            raise ValueError(
                "images_root needs positive_class: the name of the sub-folder of positive images"
            )
        if not 0 <= self.threshold < 1:
            raise ValueError(
                f"threshold must be in [0, 1) (0: the model's own), got {self.threshold}"
            )
        if self.n_bootstrap < 1:
            raise ValueError(f"n_bootstrap must be at least 1, got {self.n_bootstrap}")

    def name(self) -> str:
        """``data_name``, else the folder's name or the CSV's file name without its suffix."""
        return self.data_name or (
            Path(self.images_root).name if self.images_root else Path(self.labels_csv).stem
        )


def negative_predictive_value(y, p, threshold: float) -> float:
    y, predicted = np.asarray(y).astype(int), np.asarray(p) >= threshold
    negatives = ~predicted
    return float((y[negatives] == 0).mean()) if negatives.any() else float("nan")


def metrics_with_intervals(
    y, p, threshold: float, n_bootstrap: int, seed: int, prefix: str = ""
) -> dict[str, float]:
    out = {}
    for name, est in bootstrap(
        lambda yy, pp: external_metrics(yy, pp, threshold), y, p, n_bootstrap, seed=seed
    ).items():
        out.update(
            {
                f"{prefix}{name}": est.value,
                f"{prefix}{name}_ci_low": est.low,
                f"{prefix}{name}_ci_high": est.high,
            }
        )
    return out


def patient_level(y, p, patients) -> tuple[np.ndarray, np.ndarray]:
    """Per patient: mean probability, maximum label (see the module docstring)."""
    frame = pd.DataFrame({"y": y, "p": p, "patient": patients}).groupby("patient")
    return frame["y"].max().to_numpy(), frame["p"].mean().to_numpy()


def run_evaluate(params: EvaluateParams) -> str:
    """Evaluate one model on one labelled image set inside one MLflow run; returns the run ID."""
    params.validate()
    table = labelled_files(params.images_root, params.positive_class, params.labels_csv)
    classifier, model_id, uri = load_classifier(params.model_uri)
    config, model = classifier.config, classifier.model
    threshold = params.threshold or float(config["threshold"])
    preprocess = classifier.preprocess_input
    client = mlflow.MlflowClient(tracking_uri())
    grey, hashes, kept, skipped = decode_set(table, config, params.skip_unreadable)
    table = table.iloc[kept].reset_index(drop=True).assign(sha256=hashes)
    digest = combined_sha256(sorted(hashes))
    y = table["label"].to_numpy()
    name = params.name()
    with (
        start_stage_run(params.experiment, f"evaluate-{name}") as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        mlflow.set_tags(
            {
                "stage": "evaluate",
                "data_name": name,
                "data_digest": digest[:16],
                "model_uri": uri,
                "backbone": config["backbone"],
                "mstl.evaluated_model_id": model_id or "",
            }
        )
        log_params(
            {k: v for k, v in asdict(params).items() if k != "experiment"}
            | {
                "used_threshold": threshold,
                "n_images": len(table),
                "n_positive": int(y.sum()),
                "n_skipped": len(skipped),
            }
        )
        if skipped:
            log_table(pd.DataFrame(skipped, columns=["path", "reason"]), "data/skipped.csv")
            print(f"skipped {len(skipped)} unreadable file(s); see data/skipped.csv")
        source = params.images_root or params.labels_csv
        dataset = log_dataset(
            table[["sha256", "label", "patient_id"]],
            name=name,
            source=str(Path(source).resolve()),
            digest=digest,
            context="evaluation",
            targets="label",
        )

        prob = classifier.predict_grey(grey)
        cam = GradCam(model)
        values = metrics_with_intervals(y, prob, threshold, params.n_bootstrap, params.seed)
        at_half = point_metrics(y, prob, 0.5)
        values |= {
            "sensitivity_at_0.5": at_half["recall"],
            "specificity_at_0.5": at_half["specificity"],
        }
        if 0 < y.sum() < len(y):
            values |= shortcut_probes(model, grey, y, preprocess, cam=cam)
        else:
            print(
                f"{name} holds one class only ({'positive' if y.all() else 'negative'}): ROC AUC "
                "and the "
                f"masked-lung AUC are undefined; {'sensitivity' if y.all() else 'specificity'} is "
                "still reported"
            )
            mlflow.set_tag("auc_undefined", "the set holds one class only")
        patients = table["patient_id"].astype(str)
        if (patients != "").all():
            py, pp = patient_level(y, prob, patients)
            values |= metrics_with_intervals(
                py, pp, threshold, params.n_bootstrap, params.seed, prefix="patient_"
            )
            values["n_patients"] = len(py)
        mlflow.log_metrics(
            {k: v for k, v in values.items() if np.isfinite(v)}, model_id=model_id, dataset=dataset
        )

        title = f"{config['backbone']} on {name}"
        if 0 < y.sum() < len(y):
            log_figure(roc_figure(y, prob, title=title), "plots/roc.png")
        log_figure(
            confusion_figure(y, prob, threshold, title=f"{title}, threshold {threshold:g}"),
            "plots/confusion.png",
        )
        log_figure(
            reliability_figure(y, prob, title=f"reliability, {title}"), "plots/reliability.png"
        )
        log_figure(
            score_histogram_figure(y, prob, threshold, title=title), "plots/score_histogram.png"
        )
        sheet = error_sheet(cam, grey, y, prob, preprocess, threshold, name, kinds=("FN", "FP"))
        if sheet is not None:
            sheet.save(Path(tmp) / "gradcam_errors.png")
            mlflow.log_artifact(str(Path(tmp) / "gradcam_errors.png"), "explanations")
        predictions = table[["sha256", "patient_id", "label"]].assign(
            probability=prob, predicted=(prob >= threshold).astype(int)
        )
        log_table(predictions, "predictions.csv")

        version = model_version(client, uri)
        if version is not None:
            for key in ("roc_auc", "sensitivity", "specificity"):
                if np.isfinite(values.get(key, np.nan)):
                    client.set_model_version_tag(
                        version.name,
                        version.version,
                        f"external.{name}.{key}",
                        f"{values[key]:.4f}",
                    )
            client.set_model_version_tag(
                version.name, version.version, f"external.{name}.digest", digest[:16]
            )
            client.set_model_version_tag(
                version.name, version.version, f"external.{name}.run_id", run.info.run_id
            )
        summary = ", ".join(
            f"{k} {values[k]:.3f}"
            for k in ("roc_auc", "sensitivity", "specificity")
            if np.isfinite(values.get(k, np.nan))
        )
        print(f"evaluate: {name} ({len(table)} images): {summary}")
        return run.info.run_id
