"""Paired tests and operating points on cases with known answers."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mstl.evaluation.metrics import Estimate, bootstrap, external_metrics
from mstl.evaluation.stats import (
    auc_variance,
    cluster_bootstrap,
    delong_test,
    mcnemar_test,
    paired_tests,
    threshold_for_recall,
)


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
    balanced = mcnemar_test(
        np.r_[np.ones(5, bool), np.zeros(5, bool)], np.r_[np.zeros(5, bool), np.ones(5, bool)]
    )
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


def test_holm_matches_statsmodels_multipletests():
    from statsmodels.stats.multitest import multipletests

    from mstl.evaluation.stats import holm

    rng = np.random.default_rng(3)
    for p in (
        rng.random(12) ** 3,
        np.array([0.01, 0.01, 0.04, 0.9]),
        np.array([0.2]),
        rng.random(36) ** 4,
    ):
        reject, adjusted, *_ = multipletests(p, alpha=0.05, method="holm")
        np.testing.assert_allclose(holm(p), adjusted)
        np.testing.assert_array_equal(holm(p) < 0.05, reject)


def _binormal(rng, n, mu_a, mu_b, rho):
    y = np.repeat([1, 0], n)
    noise = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=2 * n)
    return y, y * mu_a + noise[:, 0], y * mu_b + noise[:, 1]


def test_the_detectable_auc_difference_is_detected_with_about_80_percent_power():
    """Binormal scores of two correlated models: at the difference the formula gives for the
    observed SE, DeLong's test rejects in about 80 % of simulated test sets."""
    from scipy import stats as st

    from mstl.evaluation.stats import auc_difference, delong_test, detectable_auc_difference

    rng = np.random.default_rng(0)
    n, rho, mu_b = 100, 0.6, 1.2
    se = np.mean([auc_difference(*_binormal(rng, n, mu_b, mu_b, rho))[1] for _ in range(100)])
    delta = detectable_auc_difference(se)
    assert delta == pytest.approx((1.959964 + 0.841621) * se, rel=1e-5)
    auc_b = st.norm.cdf(mu_b / np.sqrt(2))
    mu_a = np.sqrt(2) * st.norm.ppf(auc_b + delta)
    power = np.mean(
        [delong_test(*_binormal(rng, n, mu_a, mu_b, rho)).p_value < 0.05 for _ in range(400)]
    )
    assert 0.7 <= power <= 0.9


def test_the_detectable_sensitivity_difference_is_detected_with_about_80_percent_power():
    from mstl.evaluation.stats import detectable_paired_proportion_difference, mcnemar_test

    n, discordant = 150, 0.25
    d = detectable_paired_proportion_difference(n, discordant)
    assert 0 < d < discordant
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(600):
        kind = rng.choice(3, size=n, p=[1 - discordant, (discordant + d) / 2, (discordant - d) / 2])
        correct_a, correct_b = (
            kind != 2,
            kind != 1,
        )  # 0: both right, 1: only a right, 2: only b right
        hits += mcnemar_test(correct_a, correct_b).p_value < 0.05
    assert (
        0.65 <= hits / 600 <= 0.9
    )  # the exact test is a little conservative against the normal formula
    assert np.isnan(
        detectable_paired_proportion_difference(10, 0.05)
    )  # too few pairs: nothing detectable
    with pytest.raises(ValueError, match="discordant"):
        detectable_paired_proportion_difference(10, 0.0)


def test_mcnemar_standard_error_of_a_paired_difference_by_hand():
    a = np.array(
        [1] * 10 + [0] * 4 + [1] * 50 + [0] * 36, dtype=bool
    )  # 10 only a right, 4 only b right
    b = np.array([0] * 10 + [1] * 4 + [1] * 50 + [0] * 36, dtype=bool)
    result = mcnemar_test(a, b)
    assert result.difference == pytest.approx(0.06)
    assert result.se == pytest.approx(np.sqrt(14 - 6**2 / 100) / 100)
    low, high = result.interval()
    assert low == pytest.approx(0.06 - 1.959964 * result.se, rel=1e-5) and high > 0.06


def external(y, p):
    return external_metrics(y, p, 0.5)


def test_cluster_bootstrap_with_one_slice_per_patient_is_the_slice_bootstrap():
    y, s = scored(n=60, seed=3)
    p = 1 / (1 + np.exp(-s))
    slices = bootstrap(external, y, p, 200, seed=7)
    patients = [f"patient-{i}" for i in range(len(y))]
    assert cluster_bootstrap(external, y, p, patients, 200, seed=7) == slices


def test_cluster_bootstrap_of_duplicated_slices_is_the_bootstrap_of_the_patients():
    """Ten identical slices per patient carry one patient's information: resampling patients gives
    the intervals of the 40 patients, while resampling slices reads them as 400 cases."""
    y, s = scored(n=40, signal=1.5, seed=4)
    p = 1 / (1 + np.exp(-s))
    yy, pp, patients = np.repeat(y, 10), np.repeat(p, 10), np.repeat(np.arange(40), 10)
    by_patient = cluster_bootstrap(external, yy, pp, patients, 300, seed=0)
    by_slice = bootstrap(external, yy, pp, 300, seed=0)
    of_patients = bootstrap(external, y, p, 300, seed=0)
    for name in ("roc_auc", "sensitivity", "specificity", "brier"):
        assert by_patient[name].value == by_slice[name].value
        assert by_patient[name].low == pytest.approx(of_patients[name].low)
        assert by_patient[name].high == pytest.approx(of_patients[name].high)
        width = by_patient[name].high - by_patient[name].low
        assert width > 1.5 * (by_slice[name].high - by_slice[name].low), name


def test_cluster_bootstrap_leaves_out_resamples_without_a_positive_patient():
    """One positive patient of four: a quarter or more of the resamples draw no positive patient,
    so their sensitivity is undefined and left out (as the slice bootstrap does), not made 0."""
    y = np.r_[np.ones(5), np.zeros(15)].astype(int)
    p = np.r_[np.full(5, 0.9), np.full(15, 0.1)]
    patients = np.repeat(["a", "b", "c", "d"], 5)
    estimates = cluster_bootstrap(external, y, p, patients, 100, seed=0)
    assert estimates["sensitivity"] == Estimate(1.0, 1.0, 1.0)
    assert estimates["specificity"] == Estimate(1.0, 1.0, 1.0)


def test_cluster_bootstrap_needs_a_cluster_per_slice():
    with pytest.raises(ValueError, match="clusters, got 3, 3 and 2"):
        cluster_bootstrap(external, [0, 1, 1], [0.1, 0.8, 0.7], ["a", "b"], 10)


def test_copies_of_each_slice_leave_the_patient_cluster_test_unchanged_not_delong():
    """10 identical slices per patient are still one patient each: the patient-cluster paired
    test gives the same differences, SEs and p-values as one slice per patient, while DeLong on the
    slices counts 10 times the cases and its SE shrinks by about sqrt(10)."""
    from mstl.evaluation.stats import cluster_paired_tests, delong_test

    rng = np.random.default_rng(3)
    y = np.arange(40) % 2
    a, b = rng.random(40) * 0.6 + 0.3 * y, rng.random(40) * 0.6 + 0.2 * y
    patients = np.array([f"p{i}" for i in range(40)])
    once = cluster_paired_tests(y, a, b, 0.5, patients, n_bootstrap=300)
    copies = cluster_paired_tests(
        np.repeat(y, 10), np.repeat(a, 10), np.repeat(b, 10), 0.5, np.repeat(patients, 10), 300
    )
    for name in ("auc", "accuracy", "sensitivity"):
        assert copies[name].difference == pytest.approx(once[name].difference)
        assert copies[name].se == pytest.approx(once[name].se)
        assert copies[name].p_value == pytest.approx(once[name].p_value)
    assert once["auc"].difference == pytest.approx(delong_test(y, a, b).difference)
    ratio = (
        delong_test(y, a, b).se
        / delong_test(np.repeat(y, 10), np.repeat(a, 10), np.repeat(b, 10)).se
    )
    assert 2.5 < ratio < 3.7  # about sqrt(10): the slice-level test is fooled by the copies
    # one slice per patient: the cluster SE is the bootstrap SD of DeLong's quantity, near its SE
    assert once["auc"].se == pytest.approx(delong_test(y, a, b).se, rel=0.35)
