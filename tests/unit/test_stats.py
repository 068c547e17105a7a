"""Paired tests and operating points on cases with known answers."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mstl.evaluation.stats import auc_variance, delong_test, mcnemar_test, paired_tests, threshold_for_recall


def scored(n=400, signal=1.0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, signal * y + rng.normal(0, 1, n)


def test_delong_of_a_model_with_itself_is_no_difference():
    y, s = scored()
    result = delong_test(y, s, s)
    assert result.difference == 0 and result.p_value == 1.0


def test_delong_finds_a_real_difference_and_not_a_spurious_one():
    y, strong = scored(signal=2.0)
    rng = np.random.default_rng(1)
    weak = strong + rng.normal(0, 3, len(y))
    result = delong_test(y, strong, weak)
    assert result.difference == pytest.approx(roc_auc_score(y, strong) - roc_auc_score(y, weak))
    assert result.p_value < 1e-6
    same_quality = strong + rng.normal(0, 0.05, len(y))
    assert delong_test(y, strong, same_quality).p_value > 0.05


def test_delong_variance_agrees_with_the_bootstrap():
    y, s = scored(n=300, signal=1.2)
    rng = np.random.default_rng(2)
    boot = []
    for _ in range(2000):
        i = rng.integers(0, len(y), len(y))
        boot.append(roc_auc_score(y[i], s[i]))
    assert auc_variance(y, s) == pytest.approx(np.var(boot), rel=0.15)


def test_mcnemar_exact_values():
    a = np.array([True] * 10 + [True] * 20)
    b = np.array([False] * 10 + [True] * 20)
    result = mcnemar_test(a, b)  # 10 discordant pairs, all for a: p = 2 * 0.5**10
    assert result.p_value == pytest.approx(2 * 0.5**10)
    assert result.difference == pytest.approx(10 / 30)
    assert mcnemar_test(a, a).p_value == 1.0
    balanced = mcnemar_test(np.r_[np.ones(5, bool), np.zeros(5, bool)], np.r_[np.zeros(5, bool), np.ones(5, bool)])
    assert balanced.p_value == 1.0


def test_sensitivity_is_compared_on_positive_images_only():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    a = np.array([0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])  # finds every positive, no specificity
    b = np.array([0.1, 0.1, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1])
    tests = paired_tests(y, a, b, 0.5)
    assert tests["sensitivity"].difference == pytest.approx(0.5)
    assert tests["accuracy"].difference == pytest.approx(0.5 - 0.75)


def test_threshold_reaches_the_target_recall_and_is_the_highest_that_does():
    y, s = scored(n=500)
    t = threshold_for_recall(y, s, 0.95)

    def recall(th):
        return np.mean(s[y == 1] >= th)

    assert recall(t) >= 0.95
    assert recall(np.nextafter(t, np.inf)) < 0.95
    with pytest.raises(ValueError, match="target_recall"):
        threshold_for_recall(y, s, 0)
