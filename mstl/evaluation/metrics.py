"""The metric vocabulary, defined once, and percentile-bootstrap confidence intervals.

Every metric a stage logs or a report shows is one ``Metric`` in ``METRICS``: its key in the Target
runs (``name``: ``test_recall``), its key in the evaluate runs (``clinical``: ``sensitivity``), its
key in the paired tests (``paired``: ``auc``), what a reader calls it (``label``), which way is
better, and how it is computed. The named selections below say which metrics each stage and
report uses. Sensitivity (recall) is the figure that matters most here; every metric gets a 95 %
interval, because 200 test images leave a few points of uncertainty the paper does not report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from mstl import defaults
from mstl.evaluation.calibration import brier_score, expected_calibration_error


@dataclass(frozen=True)
class Scored:
    """Labels and probabilities at one threshold, with the four counts every ratio is made of."""

    y: np.ndarray  # 0/1 labels
    p: np.ndarray  # probability of the positive class
    tn: int
    fp: int
    fn: int
    tp: int

    @classmethod
    def at(cls, y_true, y_prob, threshold: float) -> Scored:
        """Count once (a ``bincount``: the bootstrap counts 1,000 times, and scikit-learn's
        ``confusion_matrix`` validates its input each time, some 400 times slower)."""
        y = np.asarray(y_true).astype(int)
        p = np.asarray(y_prob, dtype=float)
        tn, fp, fn, tp = np.bincount(2 * y + (p >= threshold), minlength=4)
        return cls(y, p, int(tn), int(fp), int(fn), int(tp))

    @property
    def n(self) -> int:
        return self.tn + self.fp + self.fn + self.tp


def ratio(a: int, b: int) -> float:
    """``a / b``; NaN when ``b`` is 0 (an undefined ratio is never a made-up 0)."""
    return a / b if b else float("nan")


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic with mid-ranks for ties: scikit-learn's value (tested),
    at a fraction of its cost, which matters because the bootstrap computes it 1,000 times per
    split. NaN with one class only."""
    positive = np.asarray(y_true).astype(bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(np.asarray(y_score, dtype=float))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class Metric:
    """One metric: its keys in each kind of run, how a reader calls it, and how it is computed."""

    name: str  # key in Target runs (``test_<name>``) and in ``point_metrics``
    label: str  # what a reader calls it: report headings, figure axes
    greater_is_better: bool
    compute: Callable[[Scored], float]
    clinical: str = ""  # key in evaluate runs (``sensitivity``, ``patient_sensitivity``); else name
    paired: str = ""  # key in the paired tests and the power table (``auc``); else clinical

    def __post_init__(self) -> None:
        object.__setattr__(self, "clinical", self.clinical or self.name)
        object.__setattr__(self, "paired", self.paired or self.clinical)

    def __call__(self, scored: Scored) -> float:
        return float(self.compute(scored))


ACCURACY = Metric("accuracy", "accuracy", True, lambda s: ratio(s.tp + s.tn, s.n))
PRECISION = Metric("precision", "PPV", True, lambda s: ratio(s.tp, s.tp + s.fp), clinical="ppv")
RECALL = Metric(
    "recall", "sensitivity", True, lambda s: ratio(s.tp, s.tp + s.fn), clinical="sensitivity"
)
SPECIFICITY = Metric("specificity", "specificity", True, lambda s: ratio(s.tn, s.tn + s.fp))
NPV = Metric("npv", "NPV", True, lambda s: ratio(s.tn, s.tn + s.fn))
F1 = Metric("f1", "F1", True, lambda s: ratio(2 * s.tp, 2 * s.tp + s.fp + s.fn))
ROC_AUC = Metric("roc_auc", "AUC", True, lambda s: roc_auc(s.y, s.p), paired="auc")
BRIER = Metric("brier", "Brier score", False, lambda s: brier_score(s.y, s.p))
ECE = Metric("ece", "ECE", False, lambda s: expected_calibration_error(s.y, s.p))

METRICS: dict[str, Metric] = {
    m.name: m for m in (ACCURACY, PRECISION, RECALL, SPECIFICITY, NPV, F1, ROC_AUC, BRIER, ECE)
}
# The named selections: which metrics each stage logs and each report shows, in their order.
PAPER = (ACCURACY, PRECISION, RECALL, SPECIFICITY, F1, ROC_AUC)  # Target runs, Table III, promote
EXTERNAL = (ROC_AUC, RECALL, SPECIFICITY, PRECISION, NPV, F1, ACCURACY, BRIER, ECE)  # evaluate
HEADLINE = (ROC_AUC, RECALL, SPECIFICITY)  # external tags, summaries, the external table
SELECTION = (RECALL, ROC_AUC)  # the champion: highest validation recall, ties by validation AUC
AT_HALF = (RECALL, SPECIFICITY)  # evaluate also logs these at threshold 0.5
PAIRED = (ROC_AUC, ACCURACY, RECALL)  # paired tests against the ImageNet baseline
PAIRED_SHOWN = (ROC_AUC, RECALL)  # their forest plot, the grid's answer and its power
METRIC_NAMES = tuple(m.name for m in PAPER)
CI_SUFFIXES = ("", "_ci_low", "_ci_high")


def compute(
    metrics: Iterable[Metric], y_true, y_prob, threshold: float, clinical: bool = False
) -> dict[str, float]:
    """``metrics`` at ``threshold``, keyed by name (``clinical``: by their evaluate-run keys)."""
    scored = Scored.at(y_true, y_prob, threshold)
    return {(m.clinical if clinical else m.name): m(scored) for m in metrics}


def point_metrics(
    y_true: np.ndarray, y_prob: np.ndarray, threshold: float = defaults.THRESHOLD
) -> dict[str, float]:
    """The paper's metrics (``PAPER``: accuracy, precision, recall (sensitivity), specificity, F1,
    ROC AUC) at one threshold. Undefined ratios (no predicted positives, one class only) are NaN
    rather than a made-up 0."""
    return compute(PAPER, y_true, y_prob, threshold)


def external_metrics(y_true, y_prob, threshold: float) -> dict[str, float]:
    """``EXTERNAL`` by their clinical keys: discrimination at ``threshold`` (sensitivity is recall,
    PPV precision) and calibration (Brier score, ECE)."""
    return compute(EXTERNAL, y_true, y_prob, threshold, clinical=True)


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float


class Estimates(dict[str, Estimate]):
    """Estimates by metric key, as ``bootstrap`` returns them."""

    def flat(self, prefix: str = "") -> dict[str, float]:
        """``{prefix}{key}``, ``..._ci_low`` and ``..._ci_high`` for each estimate: the keys that
        are logged (``test_recall``, ``patient_sensitivity_ci_low``)."""
        out = {}
        for key, est in self.items():
            for suffix, value in zip(CI_SUFFIXES, (est.value, est.low, est.high), strict=True):
                out[f"{prefix}{key}{suffix}"] = value
        return out


def bootstrap(
    statistics,
    y_true: np.ndarray,
    y_prob: np.ndarray,
    n_bootstrap: int = defaults.N_BOOTSTRAP,
    confidence: float = defaults.CONFIDENCE,
    seed: int = defaults.SEED,
) -> Estimates:
    """``statistics(y, p) -> {name: value}`` on the images, with percentile-bootstrap intervals
    (images resampled with replacement; resamples where a value is undefined are left out of its
    interval). ``scipy.stats.bootstrap`` draws the same resamples and intervals from the same seed,
    but makes the whole interval NaN when one resample is undefined (tested)."""
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
    return Estimates(
        (name, Estimate(point[name], *percentile_interval(samples[name], alpha))) for name in point
    )


def percentile_interval(samples, alpha: float) -> tuple[float, float]:
    """The ``alpha`` and ``1 - alpha`` quantiles of the defined (non-NaN) bootstrap values."""
    values = np.asarray(samples, dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


def bootstrap_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    threshold: float = defaults.THRESHOLD,
    n_bootstrap: int = defaults.N_BOOTSTRAP,
    confidence: float = defaults.CONFIDENCE,
    seed: int = defaults.SEED,
) -> Estimates:
    """The paper's metrics (``point_metrics``) with percentile-bootstrap intervals."""
    return bootstrap(
        lambda y, p: point_metrics(y, p, threshold), y_true, y_prob, n_bootstrap, confidence, seed
    )


def finite(values: dict[str, float]) -> dict[str, float]:
    """The defined values only: an undefined metric is not logged (never a made-up 0)."""
    return {k: v for k, v in values.items() if np.isfinite(v)}


def confusion(
    y_true: np.ndarray, y_prob: np.ndarray, threshold: float = defaults.THRESHOLD
) -> np.ndarray:
    """2x2 counts, rows true (negative, positive), columns predicted."""
    return skm.confusion_matrix(
        np.asarray(y_true).astype(int), (np.asarray(y_prob) >= threshold).astype(int), labels=[0, 1]
    )
