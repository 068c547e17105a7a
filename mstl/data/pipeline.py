"""The tf.data pipeline shared by training and prediction: decoded uint8 slices in, backbone input
out; the training augmentations and the test-time views.

Augmentation policies (``augment``):

- ``none``: the paper's (and the frozen-half cache's) setting.
- ``mild``: flip, small rotation and zoom (Keras layers), what ``augment=true`` always meant.
- ``field``: aimed at the gap between COVID-CT's cropped, rescaled paper figures and full-field
  clinical slices: a random resized crop or a zoom-out with black padding (the body then fills less
  of the frame, as on a scanner's full field of view), a horizontal flip, window, gamma and contrast
  jitter (papers print at arbitrary contrast), Gaussian blur and JPEG re-compression (figures are
  resampled and re-encoded). Every draw comes from stateless ops keyed by ``seed``: a run repeats,
  and each epoch draws anew.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

AUGMENTATIONS = ("none", "mild", "field")
TTA = ("none", "flip", "flip_zoom")
# field: side of the sampled box relative to the image (log-uniform); above 1 zooms out with padding
FIELD_SCALE = (0.8, 1.6)
FIELD_ASPECT = (0.9, 1.1)
FIELD_SHIFT = 0.1  # of the box side, each way
FIELD_CONTRAST = (0.75, 1.33)  # log-uniform, about mid-grey
FIELD_BRIGHTNESS = 0.1  # of the full range, each way
FIELD_GAMMA = (0.7, 1.4)  # log-uniform
FIELD_BLUR_SIGMA = (0.0, 1.2)  # pixels, one draw per batch, applied to half the batches
FIELD_JPEG_QUALITY = (30, 95)  # applied to half the images
TTA_ZOOM = (1.25, 0.9)  # flip_zoom's extra views: zoomed out (padded) and zoomed in


def augment_policy(value: bool | str) -> str:
    """The policy's name; ``false``/``true`` (the old boolean parameter) mean ``none``/``mild``."""
    text = str(value).strip().lower()
    policy = {"false": "none", "": "none", "0": "none", "true": "mild", "1": "mild"}.get(text, text)
    if policy not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {value!r}; use one of {', '.join(AUGMENTATIONS)}")
    return policy


def check_tta(tta: str) -> str:
    if tta not in TTA:
        raise ValueError(f"unknown tta {tta!r}; use one of {', '.join(TTA)}")
    return tta


def augmenter(seed: int) -> keras.Sequential:
    """Mild, CT-plausible augmentation (the ``mild`` policy)."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.05, fill_mode="constant", seed=seed),
            keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed),
        ],
        name="augment",
    )


def log_uniform(shape, bounds: tuple[float, float], seed) -> tf.Tensor:
    low, high = np.log(bounds[0]), np.log(bounds[1])
    return tf.exp(tf.random.stateless_uniform(shape, seed, low, high))


def field_geometry(x: tf.Tensor, seed) -> tf.Tensor:
    """(n, h, w) float: each image resampled from a random box, crop or larger-than-image (zoomed
    out, padded with black), half of them mirrored left-right."""
    n, size = tf.shape(x)[0], tf.shape(x)[1:3]
    s = tf.random.experimental.stateless_split(seed, 4)
    side = log_uniform([n], FIELD_SCALE, s[0])
    aspect = log_uniform([n], FIELD_ASPECT, s[1])
    height, width = side * tf.sqrt(aspect), side / tf.sqrt(aspect)
    centre = (
        0.5 + tf.random.stateless_uniform([n, 2], s[2], -FIELD_SHIFT, FIELD_SHIFT) * side[:, None]
    )
    flip = tf.random.stateless_uniform([n], s[3]) < 0.5
    x1, x2 = centre[:, 1] - width / 2, centre[:, 1] + width / 2
    x1, x2 = tf.where(flip, x2, x1), tf.where(flip, x1, x2)  # x1 > x2 samples mirrored
    boxes = tf.stack([centre[:, 0] - height / 2, x1, centre[:, 0] + height / 2, x2], axis=1)
    out = tf.image.crop_and_resize(x[..., None], boxes, tf.range(n), size, extrapolation_value=0.0)
    return out[..., 0]


def field_intensity(x: tf.Tensor, seed) -> tf.Tensor:
    """(n, h, w) float in 0..255: per-image contrast about mid-grey, brightness and gamma."""
    n = tf.shape(x)[0]
    s = tf.random.experimental.stateless_split(seed, 3)
    contrast = log_uniform([n, 1, 1], FIELD_CONTRAST, s[0])
    shift = tf.random.stateless_uniform([n, 1, 1], s[1], -FIELD_BRIGHTNESS, FIELD_BRIGHTNESS)
    gamma = log_uniform([n, 1, 1], FIELD_GAMMA, s[2])
    unit = tf.clip_by_value((x / 255.0 - 0.5) * contrast + 0.5 + shift, 0.0, 1.0)
    return 255.0 * unit**gamma


def gaussian_kernel(sigma: tf.Tensor, radius: int = 3) -> tf.Tensor:
    t = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-(t**2) / (2.0 * tf.maximum(sigma, 1e-3) ** 2))
    k = k / tf.reduce_sum(k)
    return tf.tensordot(k, k, axes=0)[:, :, None, None]


def field_blur(x: tf.Tensor, seed) -> tf.Tensor:
    """Half the batches blurred with one Gaussian (sigma drawn per batch; edges reflected)."""
    s = tf.random.experimental.stateless_split(seed, 2)
    sigma = tf.random.stateless_uniform([], s[0], *FIELD_BLUR_SIGMA)
    padded = tf.pad(x[..., None], [[0, 0], [3, 3], [3, 3], [0, 0]], mode="REFLECT")
    blurred = tf.nn.conv2d(padded, gaussian_kernel(sigma), 1, "VALID")[..., 0]
    return tf.where(tf.random.stateless_uniform([], s[1]) < 0.5, blurred, x)


def field_jpeg(x: tf.Tensor, seed) -> tf.Tensor:
    """Half the images re-encoded as JPEG at a random quality."""
    n = tf.shape(x)[0]
    s = tf.random.experimental.stateless_split(seed, 2)
    seeds = tf.random.experimental.stateless_split(s[0], n)
    apply = tf.random.stateless_uniform([n], s[1]) < 0.5

    def one(args):
        image, image_seed = args
        unit = tf.clip_by_value(image[..., None] / 255.0, 0.0, 1.0)
        low, high = FIELD_JPEG_QUALITY
        return tf.image.stateless_random_jpeg_quality(unit, low, high, image_seed)[..., 0] * 255.0

    encoded = tf.map_fn(one, (x, seeds), fn_output_signature=tf.float32)
    return tf.where(apply[:, None, None], encoded, x)


def field_augment(x: tf.Tensor, seed) -> tf.Tensor:
    """The ``field`` policy on a float batch (n, h, w) in 0..255; ``seed``: shape (2,) int."""
    s = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
    x = field_geometry(tf.cast(x, tf.float32), s[0])
    x = field_intensity(x, s[1])
    x = field_blur(x, s[2])
    return tf.clip_by_value(field_jpeg(x, s[3]), 0.0, 255.0)


def image_dataset(
    grey: np.ndarray,
    labels: np.ndarray | None,
    preprocess_input,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    augment: bool | str = False,
) -> tf.data.Dataset:
    """Decoded uint8 slices -> cache -> shuffle -> batch -> (augment) -> backbone input ->
    prefetch. ``augment``: a policy of ``AUGMENTATIONS`` (or the old true/false)."""
    policy = augment_policy(augment)
    items = grey if labels is None else (grey, labels)
    ds = tf.data.Dataset.from_tensor_slices(items).cache()
    if shuffle:
        ds = ds.shuffle(len(grey), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if labels is None:
        ds = ds.map(with_no_labels)
    if policy == "field":  # one stateless seed per batch, new ones each epoch
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds).map(augment_field)
    elif policy == "mild":
        aug = augmenter(seed)

        def mild(x, y):
            return tf.squeeze(aug(tf.cast(x[..., None], tf.float32), training=True), -1), y

        ds = ds.map(mild)

    def prepare(x, y):
        return grey_to_input(x, preprocess_input), y

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if labels is None:
        ds = ds.map(without_labels)
    return ds.prefetch(tf.data.AUTOTUNE)


def with_no_labels(x):
    return x, tf.zeros([0])


def without_labels(x, _):
    return x


def augment_field(batch, seed):
    return field_augment(batch[0], seed), batch[1]


def grey_to_input(grey_batch, preprocess_input):
    """uint8 grey (n, h, w) -> the backbone's float input (n, h, w, 3), via its own
    ``preprocess_input``."""
    x = tf.cast(grey_batch, tf.float32)[..., None]
    x = tf.repeat(x, 3, axis=-1)
    return preprocess_input(x)


def zoom_view(grey: np.ndarray, side: float) -> np.ndarray:
    """Every slice resampled from the centred box of ``side`` (relative): above 1 zooms out with
    black padding, below 1 zooms in. uint8 in, uint8 out."""
    n, h, w = grey.shape
    half = side / 2
    boxes = np.tile([0.5 - half, 0.5 - half, 0.5 + half, 0.5 + half], (n, 1)).astype(np.float32)
    out = tf.image.crop_and_resize(
        tf.cast(grey, tf.float32)[..., None], boxes, tf.range(n), (h, w), extrapolation_value=0.0
    )
    return np.clip(np.round(out.numpy()[..., 0]), 0, 255).astype(np.uint8)


def tta_views(grey: np.ndarray, tta: str) -> list[np.ndarray]:
    """The views whose predicted probabilities test-time augmentation averages: the slices
    themselves, their mirror image (``flip``), and a zoomed-out and a zoomed-in view
    (``flip_zoom``)."""
    views = [grey]
    if check_tta(tta) in ("flip", "flip_zoom"):
        views.append(np.ascontiguousarray(grey[:, :, ::-1]))
    if tta == "flip_zoom":
        views += [zoom_view(grey, side) for side in TTA_ZOOM]
    return views
