"""Automated slice selection (the paper's stated future work): keep the slices where the lungs are
in view as they are in the Target slices, instead of picking them by hand.

A slice's lung area is the air-density region inside the body: pixels below ``air_hu`` whose
connected component does not touch the image border (the air around the patient does), ignoring
specks smaller than ``min_component_fraction`` of the image (bowel gas, noise). A slice is kept when
its lung area is at least ``min_lung_fraction`` of the largest lung area in its series, which drops
the slices above the apices (only the trachea is air) and those in the abdomen.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

AIR_HU = -400.0
MIN_COMPONENT_FRACTION = 0.001
MIN_LUNG_FRACTION = 0.35


def lung_mask(hu: np.ndarray, air_hu: float = AIR_HU, min_component_fraction: float = MIN_COMPONENT_FRACTION) -> np.ndarray:
    """Air inside the body: below ``air_hu`` and not connected to the image border."""
    air = hu < air_hu
    labels, n = ndimage.label(air)
    if n == 0:
        return air
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_component_fraction * hu.size
    keep[border] = False
    keep[0] = False
    return keep[labels]


def lung_area(hu: np.ndarray, air_hu: float = AIR_HU, min_component_fraction: float = MIN_COMPONENT_FRACTION) -> float:
    """Fraction of the image covered by lung (air inside the body)."""
    return float(lung_mask(hu, air_hu, min_component_fraction).mean())


def select_slices(areas: np.ndarray, min_lung_fraction: float = MIN_LUNG_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, lung fraction relative to the series' maximum) for one series' lung areas."""
    if not 0 <= min_lung_fraction <= 1:
        raise ValueError(f"min_lung_fraction must be in [0, 1], got {min_lung_fraction}")
    areas = np.asarray(areas, dtype=float)
    peak = areas.max() if len(areas) else 0.0
    relative = areas / peak if peak > 0 else np.zeros_like(areas)
    return (relative >= min_lung_fraction) & (relative > 0), relative
