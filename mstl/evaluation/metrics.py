"""Binary classification metrics with percentile-bootstrap confidence intervals.

Sensitivity (recall) is the figure that matters most here; every metric gets a 95 % interval,
because 200 test images leave a few points of uncertainty the paper does not report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from mstl import defaults

METRIC_NAMES = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def point_metrics(
    y_true: np.ndarray, y_prob: np.ndarray, threshold: float = defaults.THRESHOLD
) -> dict[str, float]:
    """Accuracy, precision, recall (sensitivity), specificity, F1 and ROC AUC at one threshold.

    Undefined ratios (no predicted positives, one class only) are NaN rather than a made-up 0.
    """
    y_true = np.asarray(y_true).astype(int)
    y_prob = np.asarray(y_prob, dtype=float)
    y_pred = (y_prob >= threshold).astype(int)
    tp = int(np.sum((y_pred == 1) & (y_true == 1)))
    tn = int(np.sum((y_pred == 0) & (y_true == 0)))
    fp = int(np.sum((y_pred == 1) & (y_true == 0)))
    fn = int(np.sum((y_pred == 0) & (y_true == 1)))

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    auc = roc_auc(y_true, y_prob)
    return {
        "accuracy": ratio(tp + tn, len(y_true)),
        "precision": precision,
        "recall": recall,
        "specificity": ratio(tn, tn + fp),
        "f1": f1,
        "roc_auc": auc,
    }


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic with mid-ranks for ties: scikit-learn's value (tested),
    at a
    fraction of its cost, which matters because the bootstrap computes it 1,000 times per split.
    NaN with one class only."""
    positive = np.asarray(y_true).astype(bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(np.asarray(y_score, dtype=float))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float


def bootstrap(
    statistics,
    y_true: np.ndarray,
    y_prob: np.ndarray,
    n_bootstrap: int = defaults.N_BOOTSTRAP,
    confidence: float = defaults.CONFIDENCE,
    seed: int = defaults.SEED,
) -> dict[str, Estimate]:
    """``statistics(y, p) -> {name: value}`` on the images, with percentile-bootstrap intervals
    (images resampled
    with replacement; resamples where a value is undefined are left out of its interval)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be at least 1, got {n_bootstrap}")
    y_true = np.asarray(y_true).astype(int)
    y_prob = np.asarray(y_prob, dtype=float)
    if len(y_true) == 0 or len(y_true) != len(y_prob):
        raise ValueError(
            f"need equal, non-zero numbers of labels and probabilities, got {len(y_true)} and "
            f"{len(y_prob)}"
        )
    point = statistics(y_true, y_prob)
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in point}
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(y_true), len(y_true))
        for name, value in statistics(y_true[idx], y_prob[idx]).items():
            samples[name].append(value)
    alpha = (1 - confidence) / 2
    out = {}
    for name in point:
        values = np.asarray(samples[name], dtype=float)
        values = values[~np.isnan(values)]
        low, high = (
            np.quantile(values, [alpha, 1 - alpha]) if len(values) else (float("nan"), float("nan"))
        )
        out[name] = Estimate(point[name], float(low), float(high))
    return out


def bootstrap_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    threshold: float = defaults.THRESHOLD,
    n_bootstrap: int = defaults.N_BOOTSTRAP,
    confidence: float = defaults.CONFIDENCE,
    seed: int = defaults.SEED,
) -> dict[str, Estimate]:
    """The paper's metrics (``point_metrics``) with percentile-bootstrap intervals."""
    return bootstrap(
        lambda y, p: point_metrics(y, p, threshold), y_true, y_prob, n_bootstrap, confidence, seed
    )


def confusion(
    y_true: np.ndarray, y_prob: np.ndarray, threshold: float = defaults.THRESHOLD
) -> np.ndarray:
    """2x2 counts, rows true (negative, positive), columns predicted."""
    return skm.confusion_matrix(
        np.asarray(y_true).astype(int), (np.asarray(y_prob) >= threshold).astype(int), labels=[0, 1]
    )
