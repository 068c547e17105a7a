"""Calibration: does a predicted 0.8 mean COVID 8 times in 10? Brier score, expected calibration
error and the reliability diagram, plus the score histogram per class.

Both agree with scikit-learn (tested) but stay here: ``brier_score_loss`` is some 70 times
slower per call, and the bootstrap calls it 1,000 times per set; ``calibration_curve`` puts a
probability on an inner bin edge in the lower bin (ours: the upper, as logged so far) and returns
no counts.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import roc_curve

from mstl.inference.predict import apply_temperature, logit

N_BINS = 10
# how a served threshold is set: fixed (a parameter) or youden (chosen on validation)
OPERATING_POINTS = ("fixed", "youden")
TEMPERATURE_BOUNDS = (0.05, 20.0)  # a fitted temperature outside this says the fit failed


def brier_score(y_true, y_prob) -> float:
    """Mean squared difference between the probability and the 0/1 truth (0 is perfect, 0.25 is a
    coin): ``sklearn.metrics.brier_score_loss``."""
    y, p = np.asarray(y_true, dtype=float), np.asarray(y_prob, dtype=float)
    return float(np.mean((p - y) ** 2))


def reliability_bins(y_true, y_prob, n_bins: int = N_BINS) -> list[tuple[float, float, int]]:
    """(mean probability, observed positive fraction, count) per equal-width bin [a, b) of [0, 1];
    empty bins left out. A probability of exactly 1 falls in the last bin."""
    y, p = np.asarray(y_true, dtype=float), np.asarray(y_prob, dtype=float)
    index = np.minimum((p * n_bins).astype(int), n_bins - 1)
    return [
        (float(p[index == b].mean()), float(y[index == b].mean()), int((index == b).sum()))
        for b in range(n_bins)
        if (index == b).any()
    ]


def expected_calibration_error(y_true, y_prob, n_bins: int = N_BINS) -> float:
    """Sum over bins of (bin share of images) x |observed positive fraction - mean probability|."""
    n = len(np.asarray(y_true))
    return float(
        sum(
            count / n * abs(observed - mean)
            for mean, observed, count in reliability_bins(y_true, y_prob, n_bins)
        )
    )


def negative_log_likelihood(y_true, y_prob) -> float:
    """Mean binary cross-entropy of the probabilities (clipped as ``logit`` clips them)."""
    y, z = np.asarray(y_true, dtype=float), logit(y_prob)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(y_true, y_prob) -> float:
    """The temperature T minimising the negative log-likelihood of sigmoid(logit(p) / T) on a
    held-out (validation) set: one parameter, so it cannot overfit the way a binned recalibration
    can, and it leaves the ranking (AUC) alone. Needs both classes."""
    y = np.asarray(y_true).astype(int)
    if len(np.unique(y)) < 2:
        raise ValueError("temperature scaling needs both classes in the validation set")
    low, high = np.log(TEMPERATURE_BOUNDS)
    fit = minimize_scalar(
        lambda log_t: negative_log_likelihood(y, apply_temperature(y_prob, float(np.exp(log_t)))),
        bounds=(low, high),
        method="bounded",
    )
    return float(np.exp(fit.x))


def youden_threshold(y_true, y_prob) -> float:
    """The threshold maximising sensitivity + specificity - 1 (Youden's J) on a validation set:
    midway between the lowest score called positive and the next lower score, so that a new score
    between the two falls on the side neither class decided. Ties: the highest such threshold."""
    y = np.asarray(y_true).astype(int)
    if len(np.unique(y)) < 2:
        raise ValueError("choosing a threshold needs both classes in the validation set")
    fpr, tpr, cuts = roc_curve(y, np.asarray(y_prob, dtype=float), drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    below = cuts[best + 1] if best + 1 < len(cuts) else 0.0
    return float(np.clip((min(cuts[best], 1.0) + below) / 2, 1e-6, 1 - 1e-6))


def reliability_figure(y_true, y_prob, title: str = "reliability", n_bins: int = N_BINS):
    bins = reliability_bins(y_true, y_prob, n_bins)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    ax.plot(
        [b[0] for b in bins],
        [b[1] for b in bins],
        marker="o",
        label=f"model (ECE {expected_calibration_error(y_true, y_prob, n_bins):.3f})",
    )
    for mean, observed, count in bins:
        ax.annotate(
            str(count), (mean, observed), textcoords="offset points", xytext=(4, -10), fontsize=7
        )
    ax.set(
        xlabel="predicted probability of COVID (bin mean)",
        ylabel="observed fraction COVID",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def score_histogram_figure(y_true, y_prob, threshold: float, title: str = "scores per class"):
    y, p = np.asarray(y_true).astype(int), np.asarray(y_prob, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    edges = np.linspace(0, 1, 21)
    for cls, name, colour in ((0, "non-COVID", "tab:blue"), (1, "COVID", "tab:red")):
        ax.hist(
            p[y == cls],
            bins=edges,
            alpha=0.55,
            color=colour,
            label=f"{name} (n={int((y == cls).sum())})",
        )
    ax.axvline(threshold, c="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set(xlabel="predicted probability of COVID", ylabel="images", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
