"""The compiled Grad-CAM gives what the eager computation gives, with one trace for every batch
size."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mstl.data.pipeline import grey_to_input
from mstl.evaluation.gradcam import GradCam, last_conv_layer
from mstl.models import build_classifier, get_backbone
from mstl.training.fit import set_seed

SPEC = get_backbone("mobilenet_025")
SIZE = 32


@pytest.fixture(scope="module")
def model_and_slices():
    set_seed(0)
    model = build_classifier("mobilenet_025", weights=None, image_size=SIZE)
    grey = np.random.default_rng(0).integers(0, 255, (11, SIZE, SIZE)).astype(np.uint8)
    return model, grey


def eager_heatmaps(model, x):
    """Grad-CAM written out eagerly: the feature map and its gradient from the whole network on a
    tape."""
    layer = model.get_layer(last_conv_layer(model))
    probe = keras.Model(model.inputs, [layer.output, model.output])
    x = tf.convert_to_tensor(x, tf.float32)
    with tf.GradientTape() as tape:
        features, output = probe(x, training=False)
        score = output[:, 0]
    grads = tape.gradient(score, features).numpy()
    cam = np.maximum((grads.mean(axis=(1, 2), keepdims=True) * features.numpy()).sum(axis=-1), 0)[
        ..., None
    ]
    cam = tf.image.resize(cam, (SIZE, SIZE), method="bilinear").numpy()[..., 0]
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1), 0)


def test_compiled_gradcam_equals_the_eager_one_and_traces_once(model_and_slices):
    model, grey = model_and_slices
    cam = GradCam(model)
    for batch in (grey[:4], grey[4:11]):  # two batch sizes, one trace
        x = np.asarray(grey_to_input(batch, SPEC.preprocess_input))
        heat = cam(x)
        assert heat.shape == (len(batch), SIZE, SIZE)
        assert heat.max() > 0  # something to compare
        np.testing.assert_allclose(heat, eager_heatmaps(model, x), atol=1e-5)
    assert cam._heatmaps.experimental_get_tracing_count() == 1


def test_heatmaps_of_slices_in_batches_equal_one_batch(model_and_slices):
    model, grey = model_and_slices
    cam = GradCam(model)
    whole = cam(np.asarray(grey_to_input(grey, SPEC.preprocess_input)))
    np.testing.assert_allclose(
        cam.on_slices(grey, SPEC.preprocess_input, batch_size=4), whole, atol=1e-6
    )
    assert cam.on_slices(grey[:0], SPEC.preprocess_input).shape == (0, SIZE, SIZE)
