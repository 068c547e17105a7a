"""Calibration metrics against hand-computed values; the shortcut probes on inputs whose answer is
known."""

import warnings

import numpy as np
import pytest

from mstl.dicom.selection import lung_mask_8bit, otsu_threshold
from mstl.evaluation.calibration import (
    brier_score,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    youden_threshold,
)
from mstl.evaluation.metrics import roc_auc
from mstl.evaluation.probes import blank_lungs, lung_attention, mean_lung_attention
from mstl.inference.predict import apply_temperature


def test_brier_by_hand():
    # (0.9-1)^2 + (0.2-0)^2 + (0.6-1)^2 + (0.4-0)^2 = 0.01 + 0.04 + 0.16 + 0.16 = 0.37, / 4
    assert brier_score([1, 0, 1, 0], [0.9, 0.2, 0.6, 0.4]) == pytest.approx(0.0925)
    assert brier_score([1, 0], [1.0, 0.0]) == 0.0


def test_ece_by_hand():
    y = [1, 0, 1, 1, 0, 0]
    p = [0.95, 0.91, 0.15, 0.12, 0.55, 1.0]
    # bins of width 0.1: [0.1,0.2): p .15 .12 -> mean .135, observed 1.0, n 2
    #                    [0.5,0.6): p .55 -> mean .55, observed 0, n 1
    # [0.9,1.0]: p .95 .91 1.0 -> mean .953.., observed 1/3, n 3 (1.0 falls in the last bin)
    expected = (
        2 / 6 * abs(1 - 0.135)
        + 1 / 6 * abs(0 - 0.55)
        + 3 / 6 * abs(1 / 3 - (0.95 + 0.91 + 1.0) / 3)
    )
    assert expected_calibration_error(y, p) == pytest.approx(expected)
    assert [count for _, _, count in reliability_bins(y, p)] == [2, 1, 3]
    assert expected_calibration_error([0, 1, 0, 1], [0.05, 0.95, 0.05, 0.95]) == pytest.approx(0.05)


def test_lung_attention_on_known_heat_maps():
    mask = np.zeros((2, 8, 8), bool)
    mask[:, 2:6, 2:6] = True
    inside = np.zeros((8, 8))
    inside[3, 3] = 1.0  # all mass in the lungs
    half = np.zeros((8, 8))
    half[3, 3], half[0, 0] = 1.0, 1.0  # half in, half on the border
    assert lung_attention(np.stack([inside, half]), mask).tolist() == [1.0, 0.5]
    assert np.isnan(lung_attention(np.zeros((1, 8, 8)), mask[:1]))[0]


def phantom_slice(size=128):
    """A bright body on black air with two dark lungs, one holding a bright nodule, and white text
    in a corner."""
    y, x = np.mgrid[:size, :size]
    grey = np.zeros((size, size), np.uint8)
    grey[((x - 64) / 56) ** 2 + ((y - 64) / 44) ** 2 <= 1] = 180
    lungs = (((x - 42) / 16) ** 2 + ((y - 64) / 26) ** 2 <= 1) | (
        ((x - 86) / 16) ** 2 + ((y - 64) / 26) ** 2 <= 1
    )
    grey[lungs] = 40
    grey[60:64, 40:44] = 200  # a nodule inside the left lung
    grey[2:8, 2:30] = 255  # burnt-in text, outside the body
    return grey, lungs


def test_mean_lung_attention_skips_images_without_a_lung_field_or_heat_and_never_warns():
    attention = np.array([1.0, np.nan, 0.5, 0.25])  # NaN: an all-zero heat map
    found = np.array([True, True, True, False])  # the last image has no lung field
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice" would fail the test
        assert mean_lung_attention(attention, found) == 0.75
        assert np.isnan(mean_lung_attention(np.full(3, np.nan), np.ones(3, bool)))
        assert np.isnan(mean_lung_attention(attention, np.zeros(4, bool)))


def test_eight_bit_lung_field_finds_both_lungs_with_their_contents_and_not_the_air():
    grey, lungs = phantom_slice()
    assert 40 < otsu_threshold(grey) < 180
    mask = lung_mask_8bit(grey)
    assert mask[lungs].mean() > 0.98 and mask[~lungs].mean() < 0.01
    assert mask[60:64, 40:44].all()  # the nodule belongs to the lung field


def test_blanking_removes_lung_texture_and_keeps_the_rest():
    grey, _ = phantom_slice()
    mask = lung_mask_8bit(grey)[None]
    out = blank_lungs(grey[None], mask)[0]
    assert len(np.unique(out[mask[0]])) == 1  # one flat grey: texture and nodule gone
    np.testing.assert_array_equal(out[~mask[0]], grey[~mask[0]])  # text, border and body untouched


def test_brier_equals_sklearn_and_the_bins_equal_calibration_curve_off_the_bin_edges():
    """Why both stay ours: scikit-learn's ``brier_score_loss`` gives the same value (1e-15) at
    about 70 times the cost per call (the bootstrap calls it 1,000 times per set);
    ``calibration_curve`` gives the same bins (to 1e-15) except for a probability on an inner edge,
    which it puts in the lower bin where ours (and the ECE logged so far) puts it in the upper, and
    it returns no counts, which the ECE's weights and the diagram's labels need."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.25, 500), 0, 1)
    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-15)
    p = p[np.abs(p * 10 - np.round(p * 10)) > 1e-6]  # no probability on a bin edge
    y = y[: len(p)]
    observed, mean = calibration_curve(y, p, n_bins=10)
    bins = reliability_bins(y, p)
    np.testing.assert_allclose(observed, [b[1] for b in bins], rtol=0, atol=1e-15)
    np.testing.assert_allclose(mean, [b[0] for b in bins], rtol=0, atol=1e-15)
    observed, _ = calibration_curve([0, 1], [0.5, 0.55], n_bins=10)
    assert observed.tolist() == [0.0, 1.0] and [
        b[2] for b in reliability_bins([0, 1], [0.5, 0.55])
    ] == [2]


def test_temperature_scaling_recovers_a_known_over_confidence_and_keeps_the_ranking():
    """Truth drawn from sigmoid(z); the model reports sigmoid(3 z), three times too sure."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 20000)
    y = (rng.random(len(z)) < 1 / (1 + np.exp(-z))).astype(int)
    over = 1 / (1 + np.exp(-3 * z))
    t = fit_temperature(y, over)
    assert t == pytest.approx(3.0, rel=0.1)
    scaled = apply_temperature(over, t)
    assert expected_calibration_error(y, scaled) < expected_calibration_error(y, over) / 3
    assert negative_log_likelihood(y, scaled) < negative_log_likelihood(y, over)
    assert roc_auc(y, scaled) == pytest.approx(roc_auc(y, over))
    np.testing.assert_array_equal(apply_temperature(over, 1.0), over)


def test_temperature_and_threshold_need_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        fit_temperature([1, 1, 1], [0.2, 0.7, 0.9])
    with pytest.raises(ValueError, match="both classes"):
        youden_threshold([0, 0], [0.2, 0.7])


def test_youden_threshold_by_hand():
    # cut at 0.8: sensitivity 1/2, specificity 1 (J 0.5); at 0.4: 1/2, 1/2; at 0.35: 1, 1/2 (J 0.5)
    # ties go to the higher cut, 0.8, and the threshold sits midway to the next score, 0.4
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.6)
    # separable scores: a threshold between the classes
    t = youden_threshold([0, 0, 1, 1], [0.01, 0.02, 0.03, 0.04])
    assert 0.02 < t <= 0.03
