"""What the `evaluate` stage computes on one labelled image set, apart from the shortcut probes:
``EXTERNAL`` by their clinical keys with bootstrap intervals, sensitivity and specificity at 0.5,
and the same per patient; the model-version tags and the one-line summary made of them.

Patient-level metrics (with ``patient_id``): a patient's score is the mean of their slices'
probabilities and their label the maximum of their slices' labels (a patient with any COVID slice
is a COVID patient).
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

PATIENT_PREFIX = "patient_"


def patient_level(y, p, patients) -> tuple[np.ndarray, np.ndarray]:
    """Per patient: mean probability, maximum label (see the module docstring)."""
    frame = pd.DataFrame({"y": y, "p": p, "patient": patients}).groupby("patient")
    return frame["y"].max().to_numpy(), frame["p"].mean().to_numpy()


def metrics_with_intervals(
    y, p, threshold: float, n_bootstrap: int, seed: int, prefix: str = ""
) -> dict[str, float]:
    """``EXTERNAL`` by clinical key, each with ``_ci_low`` and ``_ci_high``."""
    estimates = bootstrap(
        lambda yy, pp: external_metrics(yy, pp, threshold), y, p, n_bootstrap, seed=seed
    )
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
    ``n_patients``."""
    values = metrics_with_intervals(y, p, threshold, n_bootstrap, seed)
    values |= {f"{k}_at_0.5": v for k, v in compute(AT_HALF, y, p, 0.5, clinical=True).items()}
    if patients is not None and (pd.Series(patients) != "").all():
        py, pp = patient_level(y, p, patients)
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


def predictions_table(table: pd.DataFrame, prob, threshold: float) -> pd.DataFrame:
    """Per image (by content hash): patient, label, probability, prediction at ``threshold``."""
    return table[["sha256", "patient_id", "label"]].assign(
        probability=prob, predicted=(np.asarray(prob) >= threshold).astype(int)
    )
