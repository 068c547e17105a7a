"""Metrics against scikit-learn, and bootstrap intervals on cases with known answers."""

import numpy as np
import pytest
from sklearn import metrics as skm

from mstl.evaluation import bootstrap_metrics, confusion, point_metrics
from mstl.evaluation.metrics import METRIC_NAMES, bootstrap, roc_auc


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


def test_scipy_bootstrap_draws_the_same_intervals_but_cannot_leave_undefined_resamples_out():
    """Why ``bootstrap`` stays ours: with the same seed ``scipy.stats.bootstrap`` (percentile)
    resamples the same images and gives the same intervals (to 1e-12), but one resample where a
    metric is undefined (precision with nothing predicted positive) makes its whole interval NaN,
    where ours leaves that resample out."""
    import warnings

    from scipy import stats

    def scipy_intervals(y, p, n_bootstrap, seed):
        def statistic(index):
            m = point_metrics(y[index], p[index])
            return np.array([m[name] for name in METRIC_NAMES])

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's DegenerateDataWarning on a NaN interval
            ci = stats.bootstrap(
                (np.arange(len(y)),), statistic, n_resamples=n_bootstrap, vectorized=False,
                method="percentile", rng=np.random.default_rng(seed),
            ).confidence_interval  # fmt: skip
        return dict(zip(METRIC_NAMES, zip(ci.low, ci.high, strict=True), strict=True))

    y, p = sample(200)
    ours, theirs = bootstrap_metrics(y, p, n_bootstrap=500, seed=4), scipy_intervals(y, p, 500, 4)
    for name in METRIC_NAMES:
        assert (ours[name].low, ours[name].high) == pytest.approx(theirs[name], abs=1e-12), name
    y, p = np.array([0] * 10 + [1, 1]), np.r_[np.full(10, 0.1), 0.9, 0.2]
    ours, theirs = bootstrap_metrics(y, p, n_bootstrap=500, seed=4), scipy_intervals(y, p, 500, 4)
    assert np.isnan(theirs["precision"]).all() and ours["precision"].low == 1.0
    assert ours["accuracy"].low == pytest.approx(theirs["accuracy"][0], abs=1e-12)


def test_one_vocabulary_with_unique_keys_and_the_clinical_names_of_evaluate():
    from mstl.evaluation.metrics import EXTERNAL, METRICS, PAIRED, PAPER, Scored

    assert METRIC_NAMES == ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")
    assert [m.name for m in PAPER] == list(METRIC_NAMES)
    for field in ("name", "clinical", "paired"):
        keys = [getattr(m, field) for m in METRICS.values()]
        assert len(set(keys)) == len(keys), field
    assert [m.clinical for m in EXTERNAL] == [
        "roc_auc", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy", "brier", "ece"
    ]  # fmt: skip
    assert [(m.paired, m.name) for m in PAIRED] == [
        ("auc", "roc_auc"), ("accuracy", "accuracy"), ("sensitivity", "recall")
    ]  # fmt: skip
    assert not METRICS["brier"].greater_is_better and METRICS["recall"].greater_is_better
    y, p = sample()
    s = Scored.at(y, p, 0.5)
    predicted = p >= 0.5
    # NPV as evaluate computed it before the vocabulary: predicted negatives that are negative
    assert METRICS["npv"](s) == float((y[~predicted] == 0).mean())
