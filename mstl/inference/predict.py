"""Batched prediction of a Keras classifier: one compiled forward pass per model, the same numbers
as an eager call. Every stage that predicts (Target's evaluation, evaluate, explain, the probes, the
served model) comes through here."""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf

from mstl.data.pipeline import image_dataset

_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_forward(model: keras.Model):
    """The model's inference-mode forward pass, compiled once per model for any batch size and kept
    while the model lives. A plain ``tf.function``, not Keras's ``predict_on_batch``: that one
    follows the distribution strategy the model was compiled under and returned every replica's copy
    of the batch (twice the rows under ``distribute=mirrored`` with two devices); this one runs as
    an eager call does."""
    forward = _FORWARD.get(model)
    if forward is None:
        model_ref = weakref.ref(model)  # the cache must not keep the model alive
        signature = [tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)]
        forward = tf.function(lambda x: model_ref()(x, training=False), input_signature=signature)
        _FORWARD[model] = forward
    return forward


def predict_in_batches(model: keras.Model, dataset: tf.data.Dataset) -> np.ndarray:
    """The model's outputs over a dataset of input batches, in inference mode, through its compiled
    forward pass: the frozen half, the validation and test predictions and the probes skip Python's
    layer-by-layer dispatch and give the same numbers as an eager call, bit for bit
    (tests/unit/test_fit.py)."""
    forward = compiled_forward(model)
    return np.concatenate([forward(tf.cast(x, tf.float32)).numpy() for x in dataset], axis=0)


def predict_grey(
    model: keras.Model, grey: np.ndarray, preprocess_input, batch_size: int
) -> np.ndarray:
    """The model's outputs for decoded uint8 slices, in batches."""
    return predict_in_batches(model, image_dataset(grey, None, preprocess_input, batch_size))
