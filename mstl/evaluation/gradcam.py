"""Grad-CAM: where the network looks when it calls a slice COVID (Selvaraju et al., 2017).

The gradient of the COVID score with respect to the last conv feature map, averaged per channel,
weights that map; its positive part, upsampled to the image, is overlaid on the slice. It shows
whether a model looks at the lungs or at shortcuts such as the image border or burnt-in text.
"""

from __future__ import annotations

import keras
import matplotlib
import numpy as np
import tensorflow as tf
from PIL import Image

from mstl import defaults
from mstl.data.montage import montage
from mstl.data.pipeline import image_dataset
from mstl.models.classifier import HEAD_PREFIX


def last_conv_layer(model: keras.Model) -> str:
    """The deepest layer before the head with a spatial (4-D) output."""
    for layer in reversed(model.layers):
        if not layer.name.startswith(HEAD_PREFIX) and len(layer.output.shape) == 4:
            return layer.name
    raise ValueError(f"model {model.name!r} has no spatial layer for Grad-CAM")


def weighted_feature_map(features: tf.Tensor, grads: tf.Tensor, size) -> tf.Tensor:
    """Grad-CAM's map before scaling: the feature map weighted by its gradient's mean per channel,
    rectified, resized to the image's ``size`` (height, width)."""
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))[..., None]
    return tf.image.resize(cam, size, method="bilinear")[..., 0]


def scaled_to_peak(cam: np.ndarray) -> np.ndarray:
    """Each map divided by its own maximum, so in [0, 1]; an all-zero map stays zero."""
    peak = cam.reshape(len(cam), -1).max(axis=1).reshape(-1, 1, 1)
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1), 0.0)


class GradCam:
    """Grad-CAM heat maps of one model, compiled once and reused for every batch.

    The heat map needs the gradient of the score with respect to the feature map only, so the
    backward pass runs through the head alone; in a compiled graph TensorFlow keeps just that path,
    where an eager tape walked back through the whole network. One trace serves every batch size.
    """

    def __init__(self, model: keras.Model, layer: str | None = None) -> None:
        self.model = model
        self.layer = layer or last_conv_layer(model)
        probe = keras.Model(model.inputs, [model.get_layer(self.layer).output, model.output])

        def heatmaps(x: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                features, output = probe(x, training=False)
                score = output[:, 0]
            return weighted_feature_map(features, tape.gradient(score, features), tf.shape(x)[1:3])

        self._heatmaps = tf.function(
            heatmaps, input_signature=[tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)]
        )

    def __call__(self, x) -> np.ndarray:
        """Heat maps in [0, 1] of shape (n, H, W) for a batch of preprocessed inputs (n, H, W,
        3)."""
        return scaled_to_peak(self._heatmaps(tf.convert_to_tensor(x, tf.float32)).numpy())

    def on_slices(
        self, grey: np.ndarray, preprocess_input, batch_size: int = defaults.BATCH_SIZE
    ) -> np.ndarray:
        """Heat maps (n, H, W) of decoded uint8 slices, in the batches the predictions use
        (``image_dataset``)."""
        grey = np.asarray(grey)
        if len(grey) == 0:
            return np.zeros(grey.shape[:3])
        return np.concatenate(
            [self(x) for x in image_dataset(grey, None, preprocess_input, batch_size)]
        )


def gradcam(model: keras.Model, x: np.ndarray, layer: str | None = None) -> np.ndarray:
    """Heatmaps in [0, 1] of shape (n, H, W) for a batch of preprocessed inputs (n, H, W, 3)."""
    return GradCam(model, layer)(x)


def overlay(grey: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8: the grey slice with the heatmap in a red-yellow colour scale on top."""
    colours = matplotlib.colormaps["jet"](heatmap)[..., :3]
    base = np.repeat(np.asarray(grey, dtype=np.float64)[..., None] / 255.0, 3, axis=-1)
    mixed = (1 - alpha * heatmap[..., None]) * base + alpha * heatmap[..., None] * colours
    return np.clip(np.round(mixed * 255), 0, 255).astype(np.uint8)


def explanation_sheet(
    cam: GradCam, grey: np.ndarray, preprocess_input, captions: list[str], title: str
) -> Image.Image:
    """Overlays for a batch of grey slices, as one captioned contact sheet."""
    heatmaps = cam.on_slices(grey, preprocess_input)
    return montage(
        [overlay(g, h) for g, h in zip(grey, heatmaps, strict=False)],
        captions,
        columns=min(len(grey), 6),
        title=title,
        side=160,
    )


KIND_NAMES = {
    "TP": "true positives",
    "FN": "false negatives",
    "FP": "false positives",
    "TN": "true negatives",
}


def error_sheet(
    cam: GradCam,
    grey,
    labels,
    prob,
    preprocess_input,
    threshold: float,
    what: str,
    kinds=("TP", "FN", "FP"),
    per_kind: int = 3,
) -> Image.Image | None:
    """Grad-CAM overlays of the most confident examples of each kind (TP, FN, FP, TN); None when
    there are none."""
    labels, prob = np.asarray(labels), np.asarray(prob)
    predicted = prob >= threshold
    masks = {
        "TP": predicted & (labels == 1),
        "FN": ~predicted & (labels == 1),
        "FP": predicted & (labels == 0),
        "TN": ~predicted & (labels == 0),
    }
    picks, captions = [], []
    for kind in kinds:
        order = (
            prob if kind in ("FN", "TN") else -prob
        )  # the most confidently wrong (or right) first
        chosen = [i for i in np.argsort(order) if masks[kind][i]][:per_kind]
        picks += chosen
        captions += [f"{kind} p={prob[i]:.2f}" for i in chosen]
    if not picks:
        return None
    title = f"Grad-CAM on {what}: " + ", ".join(KIND_NAMES[k] for k in kinds)
    return explanation_sheet(cam, np.asarray(grey)[picks], preprocess_input, captions, title)
