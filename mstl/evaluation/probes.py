"""Shortcut probes: is the model reading the lungs, or the page the slice was cut from?

- lung attention: the share of a Grad-CAM heat map's mass inside the lung field, averaged over
  images; a model that reads the lungs puts most of its attention there.
- masked-lung AUC: the AUC on the same images with the lung field blanked out (filled with its own
  mean grey, so texture and density are gone but the outline stays). Near 0.5 is good: without the
  lungs the model cannot tell the classes apart. Near the unmasked AUC means it reads something
  else: text, borders, colour modes, the source paper's layout.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from mstl import defaults
from mstl.dicom.selection import lung_mask_8bit
from mstl.evaluation.gradcam import GradCam
from mstl.inference.predict import predict_grey


def lung_masks(grey: np.ndarray) -> np.ndarray:
    """(n, h, w) boolean lung fields of a batch of 8-bit slices."""
    return np.stack([lung_mask_8bit(g) for g in grey])


def lung_attention(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image, the fraction of heat-map mass inside the mask (NaN where the heat map is all
    zero)."""
    heat = np.asarray(heatmaps, dtype=float).reshape(len(heatmaps), -1)
    inside = (heat * np.asarray(masks, dtype=bool).reshape(len(masks), -1)).sum(axis=1)
    total = heat.sum(axis=1)
    return np.divide(inside, total, out=np.full(len(total), np.nan), where=total > 0)


def mean_lung_attention(attention: np.ndarray, found: np.ndarray) -> float:
    """The mean over images with a lung field and some heat; NaN where no image has both (a model
    whose heat maps are all zero, as after one epoch at tiny settings), without numpy's empty-mean
    warning."""
    scored = np.asarray(found, dtype=bool) & np.isfinite(attention)
    return float(attention[scored].mean()) if scored.any() else float("nan")


def blank_lungs(grey: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The slices with each lung field filled with its own mean grey level."""
    out = np.array(grey, copy=True)
    for image, mask in zip(out, masks, strict=True):
        if mask.any():
            image[mask] = np.uint8(round(float(image[mask].mean())))
    return out


def shortcut_probes(
    model,
    grey: np.ndarray,
    labels: np.ndarray,
    preprocess_input,
    batch_size: int = defaults.BATCH_SIZE,
    cam: GradCam | None = None,
) -> dict[str, float]:
    """lung_attention (``mean_lung_attention``: over images with a lung field and some heat),
    masked_lung_auc, and the share of images in which a lung field was found (``lung_field_found``),
    for a Keras binary classifier on uint8 grey slices. ``cam``: the model's ``GradCam``, when the
    caller has one already (it is compiled once per model)."""
    cam = cam or GradCam(model)
    masks = lung_masks(grey)
    found = masks.reshape(len(masks), -1).any(axis=1)
    heat = cam.on_slices(grey, preprocess_input, batch_size)
    blanked = predict_grey(model, blank_lungs(grey, masks), preprocess_input, batch_size)[:, 0]
    attention = lung_attention(heat, masks)
    y = np.asarray(labels).astype(int)
    two_classes = 0 < y.sum() < len(y)
    return {
        "lung_attention": mean_lung_attention(attention, found),
        "masked_lung_auc": float(roc_auc_score(y, blanked)) if two_classes else float("nan"),
        "lung_field_found": float(found.mean()),
    }
