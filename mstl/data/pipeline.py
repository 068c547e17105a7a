"""The tf.data pipeline shared by training and prediction: decoded uint8 slices in, backbone input
out."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def augmenter(seed: int) -> keras.Sequential:
    """Mild, CT-plausible augmentation (off by default, as in the paper)."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.05, fill_mode="constant", seed=seed),
            keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed),
        ],
        name="augment",
    )


def image_dataset(
    grey: np.ndarray,
    labels: np.ndarray | None,
    preprocess_input,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    augment: bool = False,
) -> tf.data.Dataset:
    """Decoded uint8 slices -> cache -> shuffle -> batch -> (augment) -> backbone input ->
    prefetch."""
    items = grey if labels is None else (grey, labels)
    ds = tf.data.Dataset.from_tensor_slices(items).cache()
    if shuffle:
        ds = ds.shuffle(len(grey), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    aug = augmenter(seed) if augment else None

    def prepare(x):
        if aug is not None:
            x = tf.squeeze(aug(tf.cast(x[..., None], tf.float32), training=True), -1)
        return grey_to_input(x, preprocess_input)

    if labels is None:
        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda x, y: (prepare(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def grey_to_input(grey_batch, preprocess_input):
    """uint8 grey (n, h, w) -> the backbone's float input (n, h, w, 3), via its own
    ``preprocess_input``."""
    x = tf.cast(grey_batch, tf.float32)[..., None]
    x = tf.repeat(x, 3, axis=-1)
    return preprocess_input(x)
