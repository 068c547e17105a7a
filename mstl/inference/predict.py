"""Batched prediction of a Keras classifier: one compiled forward pass per model, the same numbers
as an eager call. Every stage that predicts (Target's evaluation, evaluate, explain, the probes, the
served model) comes through here."""

from __future__ import annotations

import weakref

import keras
import numpy as np
import tensorflow as tf

from mstl.data.pipeline import image_dataset, tta_views

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
    model: keras.Model, grey: np.ndarray, preprocess_input, batch_size: int, tta: str = "none"
) -> np.ndarray:
    """The model's outputs for decoded uint8 slices, in batches; with ``tta`` the mean of its
    outputs over the test-time views (``mstl.data.pipeline.tta_views``): for a sigmoid head, the
    mean probability."""
    outputs = [
        predict_in_batches(model, image_dataset(view, None, preprocess_input, batch_size))
        for view in tta_views(grey, tta)
    ]
    return outputs[0] if len(outputs) == 1 else np.mean(outputs, axis=0)


PROB_EPSILON = 1e-7  # probabilities are clipped this far from 0 and 1 before taking logits


def logit(prob) -> np.ndarray:
    p = np.clip(np.asarray(prob, dtype=np.float64), PROB_EPSILON, 1 - PROB_EPSILON)
    return np.log(p) - np.log1p(-p)


def apply_temperature(prob, temperature: float) -> np.ndarray:
    """sigmoid(logit(p) / T): temperature scaling (Guo et al. 2017). T > 1 softens over-confident
    probabilities; the ranking, hence the AUC, is unchanged. T = 1 returns ``prob`` itself."""
    if temperature == 1.0:
        return np.asarray(prob)
    return 1.0 / (1.0 + np.exp(-logit(prob) / temperature))


def predict_probability(
    model: keras.Model,
    grey: np.ndarray,
    preprocess_input,
    batch_size: int,
    tta: str = "none",
    temperature: float = 1.0,
) -> np.ndarray:
    """The served probability of the positive class: the sigmoid output, averaged over the
    ``tta`` views, then temperature-scaled. Target's evaluation and the served pyfunc both call
    this, so the logged metrics are the served model's."""
    prob = predict_grey(model, grey, preprocess_input, batch_size, tta)[:, 0]
    return apply_temperature(prob, temperature)
