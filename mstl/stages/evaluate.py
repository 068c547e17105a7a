"""The `evaluate` stage: score any logged or registered model on any labelled CT image set, through
exactly the served model's preprocessing, and track it: metrics with CIs (discrimination and
calibration, per image and per patient: ``mstl.evaluation.external``), the shortcut probes,
pictures, predictions per file (name, patient, content hash; misses first), where patients are known
a per-patient table and picture and patient-cluster intervals, the data set as a run input and the
metrics linked to the logged model. A registered version is tagged with its external figures.
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
from mstl.data.labelled import compile_patient_pattern, labelled_files
from mstl.evaluation.calibration import reliability_figure, score_histogram_figure
from mstl.evaluation.external import (
    ci_method,
    few_patients_note,
    one_class_note,
    patient_counts,
    patient_table,
    patients_known,
    predictions_table,
    set_metrics,
    summary,
    two_classes,
    version_tags,
)
from mstl.evaluation.gradcam import GradCam, error_sheet
from mstl.evaluation.metrics import finite
from mstl.evaluation.plots import confusion_figure, patient_strip_figure, roc_figure
from mstl.evaluation.probes import shortcut_probes
from mstl.inference.pyfunc import decode_set, load_classifier, model_version
from mstl.stages.cli import comma_items
from mstl.tracking import (
    log_dataset,
    log_figure,
    log_params,
    log_table,
    start_stage_run,
    tracking_uri,
)


@dataclass(frozen=True)
class EvaluateParams:
    """Parameters of `-e evaluate`."""

    model_uri: str = "models:/mstl-covid-ct@champion"
    images_root: str = ""  # one sub-folder per class
    positive_class: str = ""  # the sub-folder holding the positive (COVID) images
    labels_csv: str = ""  # or: path,label[,patient_id] (paths relative to the CSV's folder)
    # or the patient from the file name: a regex searched in the path relative to images_root (or
    # in the CSV's path entry), its group `patient` or its only group; not with a patient_id column
    patient_pattern: str = ""
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
        if self.patient_pattern:
            compile_patient_pattern(self.patient_pattern)

    def name(self) -> str:
        """``data_name``, else the folder's name or the CSV's file name without its suffix."""
        return self.data_name or (
            Path(self.images_root).name if self.images_root else Path(self.labels_csv).stem
        )


def external_evaluations(
    sets: str, positive_class: str, patient_pattern: str, must_exist: bool = True
) -> list[EvaluateParams]:
    """One `evaluate` template per item of the comma list ``sets`` (a folder with a sub-folder per
    class, or a labels CSV), its model to be filled in: the external sets a Target run or every
    Target cell of a grid is evaluated on, each as a nested run. Checked here, so a typo fails
    before any training: distinct names, valid parameters, and (``must_exist``) present."""
    templates = []
    for item in comma_items(sets):
        csv = item.lower().endswith(".csv")
        template = EvaluateParams(
            model_uri="",
            images_root="" if csv else item,
            positive_class="" if csv else positive_class,
            labels_csv=item if csv else "",
            patient_pattern="" if csv else patient_pattern,
        )
        template.validate()
        if must_exist and not Path(item).exists():
            raise FileNotFoundError(f"external set {item} not found")
        templates.append(template)
    names = [e.name() for e in templates]
    if len(set(names)) != len(names):
        raise ValueError(f"external_sets must have distinct names, got {names}")
    return templates


@dataclass(frozen=True)
class LabelledSet:
    """The model to evaluate and the set decoded through its own preprocessing."""

    name: str
    table: pd.DataFrame  # the kept rows, with their content hashes (``sha256``)
    grey: np.ndarray
    digest: str  # of the kept files' contents
    skipped: list  # (path, reason) of the unreadable files left out
    classifier: object
    model_id: str | None
    uri: str
    threshold: float

    @property
    def y(self) -> np.ndarray:
        return self.table["label"].to_numpy()

    @property
    def title(self) -> str:
        return f"{self.classifier.config['backbone']} on {self.name}"

    @property
    def patients(self) -> pd.Series | None:
        """Each image's patient where all are known, else None."""
        patients = self.table["patient_id"].astype(str)
        return patients if patients_known(patients) else None


def load_set(params: EvaluateParams) -> LabelledSet:
    """Resolve the model and decode the set as its served preprocessing does."""
    table = labelled_files(
        params.images_root, params.positive_class, params.labels_csv, params.patient_pattern
    )
    classifier, model_id, uri = load_classifier(params.model_uri)
    grey, hashes, kept, skipped = decode_set(table, classifier.config, params.skip_unreadable)
    table = table.iloc[kept].reset_index(drop=True).assign(sha256=hashes)
    threshold = params.threshold or float(classifier.config["threshold"])
    digest = combined_sha256(sorted(hashes))
    return LabelledSet(
        params.name(), table, grey, digest, skipped, classifier, model_id, uri, threshold
    )


def log_inputs(params: EvaluateParams, s: LabelledSet):
    """Tags, parameters, the skipped files and the set as the run's data set input (returned)."""
    mlflow.set_tags(
        {
            "stage": "evaluate",
            "data_name": s.name,
            "data_digest": s.digest[:16],
            "model_uri": s.uri,
            "backbone": s.classifier.config["backbone"],
            "mstl.evaluated_model_id": s.model_id or "",
            "ci_method": ci_method(s.patients),
        }
    )
    log_params(
        {k: v for k, v in asdict(params).items() if k != "experiment"}
        | {
            "used_threshold": s.threshold,
            "n_images": len(s.table),
            "n_positive": int(s.y.sum()),
            "n_skipped": len(s.skipped),
            "ci_method": ci_method(s.patients),
        }
        | ({} if s.patients is None else patient_counts(s.patients, s.y))
    )
    if s.skipped:
        log_table(pd.DataFrame(s.skipped, columns=["path", "reason"]), "data/skipped.csv")
        print(f"skipped {len(s.skipped)} unreadable file(s); see data/skipped.csv")
    source = params.images_root or params.labels_csv
    return log_dataset(
        s.table[["sha256", "label", "patient_id"]],
        name=s.name,
        source=str(Path(source).resolve()),
        digest=s.digest,
        context="evaluation",
        targets="label",
    )


def log_metrics(params: EvaluateParams, s: LabelledSet, prob, cam: GradCam, dataset) -> dict:
    """Compute and log every metric (linked to the model and the data set); returns them all."""
    values = set_metrics(s.y, prob, s.threshold, params.n_bootstrap, params.seed, s.patients)
    if two_classes(s.y):
        model = s.classifier.model
        values |= shortcut_probes(model, s.grey, s.y, s.classifier.preprocess_input, cam=cam)
    else:
        print(one_class_note(s.name, s.y))
        mlflow.set_tag("auc_undefined", "the set holds one class only")
    mlflow.log_metrics(finite(values), model_id=s.model_id, dataset=dataset)
    return values


def log_pictures(s: LabelledSet, prob, cam: GradCam, tmp: Path) -> None:
    """ROC (two classes), confusion, reliability, score histogram, Grad-CAM of the errors."""
    if two_classes(s.y):
        log_figure(roc_figure(s.y, prob, title=s.title), "plots/roc.png")
    log_figure(
        confusion_figure(s.y, prob, s.threshold, title=f"{s.title}, threshold {s.threshold:g}"),
        "plots/confusion.png",
    )
    log_figure(
        reliability_figure(s.y, prob, title=f"reliability, {s.title}"), "plots/reliability.png"
    )
    log_figure(
        score_histogram_figure(s.y, prob, s.threshold, title=s.title), "plots/score_histogram.png"
    )
    preprocess = s.classifier.preprocess_input
    sheet = error_sheet(cam, s.grey, s.y, prob, preprocess, s.threshold, s.name, kinds=("FN", "FP"))
    if sheet is not None:
        sheet.save(tmp / "gradcam_errors.png")
        mlflow.log_artifact(str(tmp / "gradcam_errors.png"), "explanations")


def log_patients(s: LabelledSet, prob) -> None:
    """Where patients are known: ``patients.csv``, ``plots/patients.png`` and, when a class has
    few patients, the warning that the intervals rest on them (printed and tagged)."""
    if s.patients is None:
        unnamed = int((s.table["patient_id"].astype(str) == "").sum())
        if unnamed < len(s.table):  # some named, some not: no grouping, and the user should know
            print(
                f"{s.name}: {unnamed} of {len(s.table)} images have no patient_id: "
                "no per-patient figures, intervals by slice"
            )
        return
    log_table(patient_table(s.table, prob, s.threshold), "patients.csv")
    log_figure(
        patient_strip_figure(s.patients, s.y, prob, s.threshold, title=s.title),
        "plots/patients.png",
    )
    note = few_patients_note(s.patients, s.y)
    if note:
        print(f"warning: {s.name}: {note}")
        mlflow.set_tag("ci_warning", note)


def tag_model_version(s: LabelledSet, values: dict, run_id: str) -> None:
    """A registered version evaluated here gains its external figures, the digest and this run."""
    client = mlflow.MlflowClient(tracking_uri())
    version = model_version(client, s.uri)
    if version is None:
        return
    for key, value in version_tags(s.name, values, s.digest, run_id).items():
        client.set_model_version_tag(version.name, version.version, key, value)


def run_evaluate(params: EvaluateParams) -> str:
    """Evaluate one model on one labelled image set inside one MLflow run; returns the run ID."""
    params.validate()
    s = load_set(params)
    with (
        start_stage_run(params.experiment, f"evaluate-{s.name}") as run,
        tempfile.TemporaryDirectory() as tmp,
    ):
        dataset = log_inputs(params, s)
        prob = s.classifier.predict_grey(s.grey)
        cam = GradCam(s.classifier.model)
        values = log_metrics(params, s, prob, cam, dataset)
        log_pictures(s, prob, cam, Path(tmp))
        log_table(predictions_table(s.table, prob, s.threshold), "predictions.csv")
        log_patients(s, prob)
        tag_model_version(s, values, run.info.run_id)
        print(f"evaluate: {s.name} ({len(s.table)} images): {summary(values)}")
        return run.info.run_id
