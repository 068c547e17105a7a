"""The training augmentations and the test-time views of mstl.data.pipeline, on tiny arrays."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mstl.data.pipeline import (
    augment_policy,
    field_augment,
    field_intensity,
    image_dataset,
    tta_views,
    zoom_view,
)
from mstl.inference.predict import predict_grey


def preprocess(x):
    return x / 127.5 - 1.0


def ramp(n=6, side=32) -> np.ndarray:
    """Slices whose every pixel differs from its mirror image: a left-right grey ramp plus noise."""
    rng = np.random.default_rng(0)
    base = np.linspace(0, 200, side)[None, None, :] + 40 * rng.random((n, side, side))
    return base.astype(np.uint8)


@pytest.mark.parametrize(
    ("given", "policy"),
    [(False, "none"), (True, "mild"), ("false", "none"), ("true", "mild"), ("field", "field")],
)
def test_the_old_boolean_still_means_what_it_meant(given, policy):
    assert augment_policy(given) == policy


def test_an_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="'strong'.*none, mild, field"):
        augment_policy("strong")


def test_field_augmentation_is_a_function_of_its_seed():
    x = tf.constant(ramp(), tf.float32)
    a = field_augment(x, tf.constant([1, 2], tf.int64)).numpy()
    b = field_augment(x, tf.constant([1, 2], tf.int64)).numpy()
    c = field_augment(x, tf.constant([3, 4], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 255


def test_zoom_out_pads_with_black_and_zoom_one_is_the_image():
    white = np.full((1, 20, 20), 255, np.uint8)
    out = zoom_view(white, 1.5)
    assert out[0, 0, 0] == 0 and out[0, -1, -1] == 0  # the frame around the shrunken image
    assert out[0, 10, 10] == 255
    grey = ramp(2, 20)
    np.testing.assert_array_equal(zoom_view(grey, 1.0), grey)


def test_intensity_jitter_keeps_each_images_grey_order():
    """Contrast, brightness and gamma are increasing maps (up to clipping): brighter stays
    brighter."""
    x = tf.constant(np.tile(np.arange(0, 256, 5, dtype=np.float32), (4, 1))[:, None, :])
    out = field_intensity(x, tf.constant([5, 6], tf.int64)).numpy()
    assert (np.diff(out, axis=-1) >= -1e-4).all()
    assert not np.allclose(out, x.numpy())


def test_field_dataset_repeats_under_its_seed_and_differs_between_epochs():
    grey, labels = ramp(8), np.arange(8, dtype=np.float32)

    def epoch(ds):
        batches = list(ds)
        return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])

    ds = image_dataset(grey, labels, preprocess, 4, True, 7, "field")
    (x1, y1), (x2, _) = epoch(ds), epoch(ds)
    x3, _ = epoch(image_dataset(grey, labels, preprocess, 4, True, 7, "field"))
    np.testing.assert_array_equal(x1, x3)  # same seed: the same first epoch
    assert not np.allclose(x1, x2)  # each epoch draws anew
    # labels follow their images: the same shuffled order as without augmentation
    _, y_plain = epoch(image_dataset(grey, labels, preprocess, 4, True, 7, "none"))
    np.testing.assert_array_equal(y1, y_plain)
    assert x1.shape == (8, 32, 32, 3) and x1.min() >= -1 and x1.max() <= 1


def test_tta_views_are_the_slices_their_mirror_and_two_zooms():
    grey = ramp(3, 16)
    assert len(tta_views(grey, "none")) == 1
    views = tta_views(grey, "flip_zoom")
    assert len(views) == 4
    np.testing.assert_array_equal(views[1], grey[:, :, ::-1])
    with pytest.raises(ValueError, match="unknown tta 'rotate'"):
        tta_views(grey, "rotate")


def test_prediction_with_flip_tta_is_the_mean_over_the_image_and_its_mirror():
    inputs = keras.Input((16, 16, 3))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, outputs)
    grey = ramp(5, 16)
    plain = predict_grey(model, grey, preprocess, 4)
    mirrored = predict_grey(model, np.ascontiguousarray(grey[:, :, ::-1]), preprocess, 4)
    np.testing.assert_allclose(
        predict_grey(model, grey, preprocess, 4, "flip"), (plain + mirrored) / 2, rtol=1e-6
    )
    assert not np.allclose(plain, mirrored)  # the test could fail: the mirror changes the output
