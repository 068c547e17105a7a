"""Metrics against scikit-learn, and bootstrap intervals on cases with known answers."""

import numpy as np
import pytest
from sklearn import metrics as skm

from mstl.evaluation import bootstrap_metrics, confusion, point_metrics
from mstl.evaluation.metrics import bootstrap, roc_auc


def sample(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.25, n), 0, 1)
    return y, p


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_point_metrics_equal_sklearn(threshold):
    y, p = sample()
    pred = (p >= threshold).astype(int)
    m = point_metrics(y, p, threshold)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert confusion(y, p, threshold).tolist() == [[tn, fp], [fn, tp]]


@pytest.mark.parametrize("decimals", [1, 2, 8])  # 1 decimal: almost every score tied with others
def test_roc_auc_equals_sklearn_with_ties_and_so_do_the_bootstrap_intervals(decimals):
    y, p = sample(seed=decimals)
    p = np.round(p, decimals)
    assert roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert np.isnan(roc_auc(np.ones(5), p[:5]))
    ours = bootstrap_metrics(y, p, n_bootstrap=200)["roc_auc"]
    reference = bootstrap(lambda a, b: {"roc_auc": skm.roc_auc_score(a, b)}, y, p, n_bootstrap=200)[
        "roc_auc"
    ]
    assert (ours.value, ours.low, ours.high) == pytest.approx(
        (reference.value, reference.low, reference.high), abs=1e-12
    )


def test_undefined_ratios_are_nan_not_zero():
    m = point_metrics(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.3]))
    assert np.isnan(m["precision"])  # nothing predicted positive
    assert m["recall"] == 0.0


def test_perfect_predictions_have_degenerate_intervals():
    y = np.array([0, 1] * 50)
    est = bootstrap_metrics(y, y.astype(float), n_bootstrap=200)
    for name in ("accuracy", "recall", "specificity", "roc_auc"):
        assert (est[name].value, est[name].low, est[name].high) == (1.0, 1.0, 1.0)


def test_accuracy_interval_matches_the_binomial_width():
    # 1000 images, 800 right: the 95 % interval is about 0.8 +- 1.96 * sqrt(0.8 * 0.2 / 1000) =
    # +-0.0248.
    y = np.ones(1000, int)
    p = np.r_[np.ones(800), np.zeros(200)]
    est = bootstrap_metrics(y, p, n_bootstrap=2000, seed=1)["accuracy"]
    assert est.value == 0.8
    assert est.low == pytest.approx(0.8 - 0.0248, abs=0.006)
    assert est.high == pytest.approx(0.8 + 0.0248, abs=0.006)


def test_intervals_contain_the_estimate_and_narrow_with_more_data():
    small = bootstrap_metrics(*sample(100), n_bootstrap=300)
    large = bootstrap_metrics(*sample(2000), n_bootstrap=300)
    for name, est in small.items():
        assert est.low <= est.value <= est.high, name
    assert (large["roc_auc"].high - large["roc_auc"].low) < (
        small["roc_auc"].high - small["roc_auc"].low
    )


def test_bootstrap_is_seeded():
    y, p = sample()
    assert bootstrap_metrics(y, p, n_bootstrap=100, seed=3) == bootstrap_metrics(
        y, p, n_bootstrap=100, seed=3
    )


@pytest.mark.parametrize(
    "kwargs, match", [({"confidence": 1.5}, "confidence"), ({"n_bootstrap": 0}, "n_bootstrap")]
)
def test_impossible_parameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_metrics(*sample(), **kwargs)
