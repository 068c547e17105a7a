"""What the `evaluate` stage computes on one labelled image set, apart from the shortcut probes:
``EXTERNAL`` by their clinical keys with bootstrap intervals, sensitivity and specificity at 0.5,
and the same per patient; the model-version tags and the one-line summary made of them.

Where every image's patient is known: the slice-level intervals come from a patient-cluster
bootstrap (``stats.cluster_bootstrap``: patients resampled, all their slices taken), else from the
slice bootstrap; and patient-level metrics: a patient's score is the mean of their slices'
probabilities, their label the maximum of their slices' labels (a patient with any COVID slice is a
COVID patient) and their prediction that mean at the threshold.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mstl.evaluation.metrics import (
    AT_HALF,
    HEADLINE,
    bootstrap,
    compute,
    external_metrics,
)
from mstl.evaluation.stats import cluster_bootstrap

PATIENT_PREFIX = "patient_"
CLUSTER_BOOTSTRAP, SLICE_BOOTSTRAP = "patient_cluster_bootstrap", "slice_bootstrap"
# fewer patients than this in a class: intervals resampled from so few clusters are unreliable
MIN_PATIENTS_PER_CLASS = 10
OUTCOMES = ("fn", "fp", "tp", "tn")  # predictions.csv's order: the misses first


def patients_known(patients) -> bool:
    """Every image has a patient id (a partly filled column groups nothing)."""
    return patients is not None and bool((pd.Series(patients, dtype=str) != "").all())


def patient_ids(predictions: pd.DataFrame) -> pd.Series | None:
    """The predictions' patient of each slice, or None where `evaluate` knew no patients."""
    if "patient_id" not in predictions:
        return None
    ids = predictions["patient_id"].fillna("").astype(str)
    return ids if patients_known(ids) else None


def ci_method(patients) -> str:
    """How the slice-level intervals were drawn: by patient where patients are known."""
    return CLUSTER_BOOTSTRAP if patients_known(patients) else SLICE_BOOTSTRAP


def patient_level(y, p, patients) -> tuple[np.ndarray, np.ndarray]:
    """Per patient: mean probability, maximum label (see the module docstring)."""
    frame = pd.DataFrame({"y": y, "p": p, "patient": patients}).groupby("patient")
    return frame["y"].max().to_numpy(), frame["p"].mean().to_numpy()


def metrics_with_intervals(
    y, p, threshold: float, n_bootstrap: int, seed: int, prefix: str = "", clusters=None
) -> dict[str, float]:
    """``EXTERNAL`` by clinical key, each with ``_ci_low`` and ``_ci_high``: resampling
    ``clusters`` (patients) when given, else the images."""

    def statistics(yy, pp):
        return external_metrics(yy, pp, threshold)

    if clusters is None:
        estimates = bootstrap(statistics, y, p, n_bootstrap, seed=seed)
    else:
        estimates = cluster_bootstrap(statistics, y, p, clusters, n_bootstrap, seed=seed)
    return estimates.flat(prefix)


def two_classes(y) -> bool:
    """Both classes present: ROC AUC (and the masked-lung AUC) are defined."""
    y = np.asarray(y)
    return bool(0 < y.sum() < len(y))


def one_class_note(name: str, y) -> str:
    """What a one-class set still reports, and what it cannot."""
    positive = bool(np.asarray(y).all())
    return (
        f"{name} holds one class only ({'positive' if positive else 'negative'}): ROC AUC and the "
        f"masked-lung AUC are undefined; {'sensitivity' if positive else 'specificity'} is still "
        "reported"
    )


def set_metrics(
    y, p, threshold: float, n_bootstrap: int, seed: int, patients=None
) -> dict[str, float]:
    """Every value an evaluate run logs except the shortcut probes (NaN where undefined): per image
    with intervals, ``<clinical>_at_0.5``, and with ``patients`` (none empty) ``patient_...`` and
    ``n_patients``, the per-image intervals then by patient (``ci_method``)."""
    known = patients_known(patients)
    clusters = list(map(str, patients)) if known else None
    values = metrics_with_intervals(y, p, threshold, n_bootstrap, seed, clusters=clusters)
    values |= {f"{k}_at_0.5": v for k, v in compute(AT_HALF, y, p, 0.5, clinical=True).items()}
    if known:
        py, pp = patient_level(y, p, clusters)
        values |= metrics_with_intervals(py, pp, threshold, n_bootstrap, seed, PATIENT_PREFIX)
        values["n_patients"] = len(py)
    return values


def defined(values: dict[str, float], keys) -> dict[str, float]:
    """The finite ``values`` among ``keys``, in their order."""
    return {k: values[k] for k in keys if np.isfinite(values.get(k, np.nan))}


def version_tags(name: str, values: dict[str, float], digest: str, run_id: str) -> dict[str, str]:
    """The tags a registered version gains from an evaluation on the set ``name``."""
    headline = defined(values, [m.clinical for m in HEADLINE])
    return {f"external.{name}.{k}": f"{v:.4f}" for k, v in headline.items()} | {
        f"external.{name}.digest": digest[:16],
        f"external.{name}.run_id": run_id,
    }


def summary(values: dict[str, float]) -> str:
    """``roc_auc 0.912, sensitivity 0.870, ...``: the defined headline figures."""
    headline = defined(values, [m.clinical for m in HEADLINE])
    return ", ".join(f"{k} {v:.3f}" for k, v in headline.items())


def outcomes(y, predicted) -> np.ndarray:
    """``tp``, ``fn``, ``fp`` or ``tn`` per case."""
    y, predicted = np.asarray(y).astype(int), np.asarray(predicted).astype(int)
    return np.array(["tn", "fp", "fn", "tp"])[2 * y + predicted]


def misses_first(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows by outcome (fn, fp, tp, tn), the most confidently wrong first within each."""
    wrongness = (frame["label"] - frame["probability"]).abs()
    rank = frame["outcome"].map({o: i for i, o in enumerate(OUTCOMES)})
    order = np.lexsort((-wrongness.to_numpy(), rank.to_numpy()))
    return frame.iloc[order].reset_index(drop=True)


def predictions_table(table: pd.DataFrame, prob, threshold: float) -> pd.DataFrame:
    """Per image: its file (as the user names it), patient, content hash, label, probability,
    prediction at ``threshold`` and outcome; the misses first (``misses_first``)."""
    predicted = (np.asarray(prob) >= threshold).astype(int)
    frame = table[["file", "patient_id", "sha256", "label"]].assign(
        probability=np.asarray(prob, dtype=float),
        predicted=predicted,
        outcome=outcomes(table["label"], predicted),
    )
    return misses_first(frame)


def patient_table(table: pd.DataFrame, prob, threshold: float) -> pd.DataFrame:
    """Per patient: label (any positive slice), slices, mean probability, the share of slices
    predicted positive, the patient's prediction (mean probability at ``threshold``) and outcome;
    the misses first."""
    slices = pd.DataFrame(
        {
            "patient_id": table["patient_id"].astype(str).to_numpy(),
            "label": np.asarray(table["label"]).astype(int),
            "probability": np.asarray(prob, dtype=float),
        }
    )
    slices["positive"] = slices["probability"] >= threshold
    frame = slices.groupby("patient_id", sort=True).agg(
        label=("label", "max"),
        n_slices=("label", "size"),
        mean_probability=("probability", "mean"),
        fraction_predicted_positive=("positive", "mean"),
    )
    frame = frame.reset_index()
    frame["predicted"] = (frame["mean_probability"] >= threshold).astype(int)
    frame["outcome"] = outcomes(frame["label"], frame["predicted"])
    ranked = misses_first(frame.rename(columns={"mean_probability": "probability"}))
    return ranked.rename(columns={"probability": "mean_probability"})


def patient_counts(patients, y) -> dict[str, int]:
    """Positive and negative patients (a patient is positive with any positive slice)."""
    per_patient = pd.Series(np.asarray(y).astype(int)).groupby(np.asarray(patients)).max()
    positive = int(per_patient.sum())
    return {"n_patients_positive": positive, "n_patients_negative": len(per_patient) - positive}


def few_patients_note(patients, y) -> str | None:
    """A warning when a class has fewer than ``MIN_PATIENTS_PER_CLASS`` patients: the intervals
    then resample so few clusters that they are unreliable (None when there are enough)."""
    positive, negative = patient_counts(patients, y).values()
    if min(positive, negative) >= MIN_PATIENTS_PER_CLASS:
        return None
    return (
        f"only {positive} positive and {negative} negative patient(s) "
        f"(fewer than {MIN_PATIENTS_PER_CLASS} in a class): the intervals resample so few "
        "patients that they are unreliable; read the per-patient table"
    )
