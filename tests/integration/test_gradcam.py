"""Grad-CAM on a network trained to find a bright patch: the heat lies on the patch."""

import numpy as np
import pytest

from mstl.data.pipeline import grey_to_input
from mstl.evaluation.gradcam import gradcam, last_conv_layer, overlay
from mstl.models import TARGET_OUTPUT, build_classifier, get_backbone
from mstl.training.fit import FitConfig, fit_classifier, set_seed

pytestmark = pytest.mark.integration  # trains a network


@pytest.fixture(scope="module")
def patch_model():
    """MobileNet-0.25 from scratch, trained to call images with a bright top-left patch positive."""
    set_seed(0)
    rng = np.random.default_rng(0)
    n, size = 96, 96
    grey = rng.integers(0, 100, (n, size, size)).astype(np.uint8)
    y = (np.arange(n) % 2).astype("float32")
    grey[y == 1, 8:40, 8:40] = 250
    model = build_classifier(
        "mobilenet_025", weights="none", image_size=size, train_batchnorm=False
    )
    fit_classifier(
        model,
        (grey[:64], y[:64]),
        (grey[64:], y[64:]),
        get_backbone("mobilenet_025").preprocess_input,
        TARGET_OUTPUT,
        FitConfig(
            epochs=8, batch_size=16, learning_rate=0.05, log_to_mlflow=False, cache_frozen=False
        ),
    )
    return model, grey, y


def test_heatmap_is_normalised_and_image_sized(patch_model):
    model, grey, _ = patch_model
    x = np.asarray(grey_to_input(grey[:4], get_backbone("mobilenet_025").preprocess_input))
    heat = gradcam(model, x)
    assert heat.shape == (4, 96, 96)
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    assert last_conv_layer(model) == "conv_pw_13_relu"


def test_heat_of_positives_lies_on_the_patch(patch_model):
    model, grey, y = patch_model
    positives = grey[64:][y[64:] == 1]
    x = np.asarray(grey_to_input(positives, get_backbone("mobilenet_025").preprocess_input))
    heat = gradcam(model, x)
    inside = heat[:, 8:40, 8:40].mean()
    outside = heat[:, 56:, 56:].mean()
    assert inside > outside


def test_overlay_is_rgb_and_keeps_cold_pixels_grey():
    grey = np.full((10, 10), 100, np.uint8)
    heat = np.zeros((10, 10))
    heat[0, 0] = 1.0
    out = overlay(grey, heat)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert (out[5, 5] == 100).all() and not (out[0, 0] == 100).all()
