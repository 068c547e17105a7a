"""Paired comparisons of two classifiers on the same test images, and operating points.

- DeLong's test for two correlated ROC AUCs (DeLong, DeLong & Clarke-Pearson 1988), with the fast
  structural-components algorithm of Sun & Xu (2014).
- McNemar's exact test for paired proportions: accuracy (is each image classified right?) and
  sensitivity (is each positive image found?).
- The threshold chosen on validation data to reach a target sensitivity.
- Holm's step-down correction for a family of tests, and the smallest differences a test set can
  detect (power), so a null result can be read for what it is.
- The patient-cluster bootstrap: slices of one patient are correlated, so their intervals come from
  resampling patients (all of a patient's slices together), not slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import brentq

from mstl import defaults
from mstl.evaluation.metrics import (
    ACCURACY,
    RECALL,
    ROC_AUC,
    Estimate,
    Estimates,
    bootstrap,
)


@dataclass(frozen=True)
class PairedTest:
    statistic: float
    p_value: float
    difference: float  # first minus second
    se: float = float(
        "nan"
    )  # standard error of the difference (normal approximation), for intervals and power

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        z = stats.norm.ppf(0.5 + confidence / 2)
        return self.difference - z * self.se, self.difference + z * self.se


def _placements(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """DeLong structural components V10 (per positive), V01 (per negative) and the AUC."""
    pos, neg = scores[y == 1], scores[y == 0]
    # V10[i] = P(score of positive i > a random negative) (+ half ties), likewise V01 for negatives
    greater = (pos[:, None] > neg[None, :]).astype(float) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = greater.mean(axis=1), 1.0 - greater.mean(axis=0)
    return v10, v01, float(greater.mean())


def auc_difference(y_true, scores_a, scores_b) -> tuple[float, float]:
    """AUC(a) - AUC(b) and DeLong's standard error of that difference, for two models on the same
    images."""
    y = np.asarray(y_true).astype(int)
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if not (len(y) == len(a) == len(b)) or not 0 < y.sum() < len(y):
        raise ValueError("need the same images for both models and both classes present")
    v10a, v01a, auc_a = _placements(a, y)
    v10b, v01b, auc_b = _placements(b, y)
    s10 = np.cov(np.vstack([v10a, v10b]))
    s01 = np.cov(np.vstack([v01a, v01b]))
    cov = s10 / len(v10a) + s01 / len(v01a)
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    return float(auc_a - auc_b), float(np.sqrt(max(variance, 0.0)))


def delong_test(y_true, scores_a, scores_b) -> PairedTest:
    """Two-sided DeLong test of AUC(a) = AUC(b) for scores of two models on the same images."""
    difference, se = auc_difference(y_true, scores_a, scores_b)
    if se <= 0:
        return PairedTest(0.0, 1.0, difference, se)
    z = difference / se
    return PairedTest(float(z), float(2 * stats.norm.sf(abs(z))), float(difference), se)


def auc_variance(y_true, scores) -> float:
    """DeLong's variance of one AUC estimate."""
    y = np.asarray(y_true).astype(int)
    v10, v01, _ = _placements(np.asarray(scores, dtype=float), y)
    return float(np.var(v10, ddof=1) / len(v10) + np.var(v01, ddof=1) / len(v01))


def mcnemar_test(correct_a, correct_b) -> PairedTest:
    """Exact (binomial) McNemar test on paired right/wrong outcomes; difference is in proportion
    right."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError("need paired outcomes on the same, non-empty set of images")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = only_a + only_b
    p = (
        1.0
        if discordant == 0
        else float(stats.binomtest(min(only_a, only_b), discordant, 0.5).pvalue)
    )
    n = len(a)
    se = float(
        np.sqrt(max(discordant - (only_a - only_b) ** 2 / n, 0.0)) / n
    )  # paired proportions (Wald)
    return PairedTest(float(min(only_a, only_b)), min(p, 1.0), float(a.mean() - b.mean()), se)


def paired_tests(y_true, prob_a, prob_b, threshold: float) -> dict[str, PairedTest]:
    """DeLong for AUC, McNemar for accuracy and for sensitivity (on the positive images)."""
    y = np.asarray(y_true).astype(int)
    pred_a, pred_b = np.asarray(prob_a) >= threshold, np.asarray(prob_b) >= threshold
    positive = y == 1
    return {
        ROC_AUC.paired: delong_test(y, prob_a, prob_b),
        ACCURACY.paired: mcnemar_test(pred_a == y, pred_b == y),
        RECALL.paired: mcnemar_test(pred_a[positive], pred_b[positive]),
    }


CLUSTER_TEST = "patient-cluster bootstrap"


def cluster_paired_tests(
    y_true,
    prob_a,
    prob_b,
    threshold: float,
    clusters,
    n_bootstrap: int = defaults.N_BOOTSTRAP,
    seed: int = defaults.SEED,
) -> dict[str, PairedTest]:
    """The differences of ``paired_tests`` (AUC, accuracy, sensitivity of a minus b) where the
    images are slices of few patients: the standard error is the SD of the difference over
    ``cluster_bootstrap`` resamples of patients (resamples without both classes left out), and the
    p-value the two-sided normal one of difference / SE. Slice-level DeLong and McNemar would count
    296 correlated slices of 6 patients as 296 independent cases. Same seeded draws of patients as
    ``cluster_bootstrap``'s intervals."""
    y = np.asarray(y_true).astype(int)
    a, b = np.asarray(prob_a, dtype=float), np.asarray(prob_b, dtype=float)
    members = cluster_members(clusters, len(y), len(a), len(b))
    rng = np.random.default_rng(seed)
    point = _differences(y, a, b, threshold)
    drawn = {name: [] for name in point}
    for _ in range(n_bootstrap):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        for name, value in _differences(y[idx], a[idx], b[idx], threshold).items():
            drawn[name].append(value)
    out = {}
    for name, value in point.items():
        values = np.asarray(drawn[name], dtype=float)
        values = values[np.isfinite(values)]
        se = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        z = value / se if se > 0 else 0.0
        p = float(2 * stats.norm.sf(abs(z))) if se > 0 else 1.0
        out[name] = PairedTest(float(z), p, float(value), se)
    return out


def _differences(y: np.ndarray, a: np.ndarray, b: np.ndarray, threshold: float) -> dict:
    """AUC, accuracy and sensitivity of a minus b on these slices (NaN where undefined)."""
    right_a, right_b = (a >= threshold) == y, (b >= threshold) == y
    positive = y == 1
    return {
        ROC_AUC.paired: _placements(a, y)[2] - _placements(b, y)[2]
        if 0 < positive.sum() < len(y)
        else np.nan,
        ACCURACY.paired: float(right_a.mean() - right_b.mean()),
        RECALL.paired: float(right_a[positive].mean() - right_b[positive].mean())
        if positive.any()
        else np.nan,
    }


def threshold_for_recall(y_true, prob, target_recall: float) -> float:
    """The highest threshold whose recall on these (validation) images reaches ``target_recall``."""
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    y = np.asarray(y_true).astype(int)
    positives = np.sort(np.asarray(prob, dtype=float)[y == 1])[::-1]
    if len(positives) == 0:
        raise ValueError("no positive images to set a sensitivity on")
    needed = int(np.ceil(target_recall * len(positives)))
    return float(positives[needed - 1])


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control without assuming independence):
    the i-th smallest p times (m - i + 1), made monotone, capped at 1. Reject where adjusted <
    alpha. statsmodels' ``multipletests(method="holm")`` gives the same values (tested), but is a
    65 MB dependency (with patsy and formulaic) for these six lines, so it stays a test one."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def detectable_auc_difference(
    se_difference: float, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest true AUC difference a two-sided DeLong test at ``alpha`` detects with ``power``,
    given the standard error of the paired difference on this test set (normal approximation:
    (z_{1-a/2} + z_power) se)."""
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * se_difference)


def detectable_paired_proportion_difference(
    n: int, discordant: float, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest difference in paired proportions (e.g. sensitivity on ``n`` positives) that
    McNemar's test at ``alpha`` detects with ``power`` when a share ``discordant`` of the pairs
    disagree (Connor 1987): solve n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2 for d."""
    if n < 1 or not 0 < discordant <= 1:
        raise ValueError(
            f"need n >= 1 and a discordant share in (0, 1], got n={n}, discordant={discordant}"
        )
    za, zb = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)

    def needed(d: float) -> float:
        return (za * np.sqrt(discordant) + zb * np.sqrt(discordant - d * d)) ** 2 / (d * d) - n

    top = discordant  # the proportions differ at most by the share of pairs that disagree
    if needed(top) > 0:
        return float("nan")  # no difference this large is detectable: too few pairs
    return float(brentq(needed, 1e-9, top))


def cluster_members(clusters, *lengths: int) -> list[np.ndarray]:
    """The slice indices of each cluster (patient), by first appearance; every array of the
    caller (``lengths``: labels, probabilities) must have one entry per slice."""
    codes, names = pd.factorize(pd.Series(clusters).astype(str))
    if len(set(lengths) | {len(codes)}) != 1 or len(codes) == 0:
        counts = ", ".join(str(n) for n in lengths)
        raise ValueError(
            "need equal, non-zero numbers of labels, probabilities and clusters, got "
            f"{counts} and {len(codes)}"
        )
    return [np.flatnonzero(codes == k) for k in range(len(names))]


def cluster_bootstrap(
    statistics,
    y_true,
    y_prob,
    clusters,
    n_bootstrap: int = defaults.N_BOOTSTRAP,
    confidence: float = defaults.CONFIDENCE,
    seed: int = defaults.SEED,
) -> Estimates:
    """``statistics(y, p)`` on all the slices, with percentile intervals from resampling
    ``clusters`` (patients) with replacement and taking all their slices: 296 slices of 6 patients
    vary like 6 cases, not 296. It runs ``metrics.bootstrap`` itself on the patients' indices (same
    seeded draws, same handling of resamples where a value is undefined, e.g. no positive patient
    drawn), so with one slice per patient, in slice order, it gives exactly the slice bootstrap."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(y_prob, dtype=float)
    members = cluster_members(clusters, len(y), len(p))

    def on_slices(chosen, _):
        idx = np.concatenate([members[k] for k in chosen])
        return statistics(y[idx], p[idx])

    index = np.arange(len(members))
    drawn = bootstrap(on_slices, index, index, n_bootstrap, confidence, seed)
    point = statistics(y, p)  # in the slices' own order, exactly the slice-level value
    return Estimates((k, Estimate(point[k], e.low, e.high)) for k, e in drawn.items())
