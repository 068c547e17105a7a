"""Automated slice selection (the paper's stated future work): keep the slices where the lungs are
in view as they are in the Target slices, instead of picking them by hand.

A slice's lung area is the air-density region inside the body: pixels below ``air_hu`` whose
connected component does not touch the image border (the air around the patient does), ignoring
specks smaller than ``min_component_fraction`` of the image (bowel gas, noise). A slice is kept when
its lung area is at least ``min_lung_fraction`` of the largest lung area in its series, which drops
the slices above the apices (only the trachea is air) and those in the abdomen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mstl.dicom.series import Series, read_hu, window

AIR_HU = -400.0
MIN_COMPONENT_FRACTION = 0.001
MIN_LUNG_FRACTION = 0.35


def enclosed_components(
    mask: np.ndarray, min_component_fraction: float = MIN_COMPONENT_FRACTION
) -> np.ndarray:
    """The connected components of ``mask`` that neither touch the border nor are specks."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_component_fraction * mask.size
    keep[border] = False
    keep[0] = False
    return keep[labels]


def lung_mask(
    hu: np.ndarray, air_hu: float = AIR_HU, min_component_fraction: float = MIN_COMPONENT_FRACTION
) -> np.ndarray:
    """Air inside the body: below ``air_hu`` and not connected to the image border."""
    return enclosed_components(hu < air_hu, min_component_fraction)


def otsu_threshold(grey: np.ndarray) -> float:
    """The grey level that best separates dark from bright pixels (Otsu, 1979), between two integer
    levels. Kept by hand: scikit-image's ``filters.threshold_otsu`` draws the same masks but would
    bring a large dependency for these lines (docs/choices.md)."""
    counts = np.bincount(np.asarray(grey, dtype=np.uint8).ravel(), minlength=256).astype(float)
    levels = np.arange(256)
    w0 = np.cumsum(counts)
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * levels)
    mean0 = np.divide(m0, w0, out=np.zeros(256), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros(256), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(np.argmax(between)) + 0.5


LUNG_FIELD_MIN_FRACTION = 0.005
MAX_BORDER_SHARE = 0.25


def lung_mask_8bit(
    grey: np.ndarray,
    min_component_fraction: float = LUNG_FIELD_MIN_FRACTION,
    max_border_share: float = MAX_BORDER_SHARE,
) -> np.ndarray:
    """The lung field of an 8-bit slice with no HU (a PNG or JPG): as ``lung_mask`` does with HU,
    the dark pixels (below Otsu's threshold) that are not the air around the body. Slices cut from
    papers are often cropped through a lung, so a dark region counts as outside air only when it
    runs along more than ``max_border_share`` of the image's edge, not merely when it touches it.
    Holes in the field (vessels, nodules, consolidation) are filled, so what the lungs contain
    belongs to them."""
    dark = np.asarray(grey) < otsu_threshold(grey)
    labels, n = ndimage.label(dark)
    if n == 0:
        return dark
    edge = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    along_edge = np.bincount(edge, minlength=n + 1) / len(edge)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = (sizes >= min_component_fraction * dark.size) & (along_edge <= max_border_share)
    keep[0] = False
    return ndimage.binary_fill_holes(keep[labels])


def lung_area(
    hu: np.ndarray, air_hu: float = AIR_HU, min_component_fraction: float = MIN_COMPONENT_FRACTION
) -> float:
    """Fraction of the image covered by lung (air inside the body)."""
    return float(lung_mask(hu, air_hu, min_component_fraction).mean())


def select_slices(
    areas: np.ndarray, min_lung_fraction: float = MIN_LUNG_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, lung fraction relative to the series' maximum) for one series' lung areas."""
    if not 0 <= min_lung_fraction <= 1:
        raise ValueError(f"min_lung_fraction must be in [0, 1], got {min_lung_fraction}")
    areas = np.asarray(areas, dtype=float)
    peak = areas.max() if len(areas) else 0.0
    relative = areas / peak if peak > 0 else np.zeros_like(areas)
    return (relative >= min_lung_fraction) & (relative > 0), relative


@dataclass
class SeriesSelection:
    """One series read once: each slice windowed to 8 bits, its lung area, and which are kept."""

    windowed: list[np.ndarray]
    areas: np.ndarray
    keep: np.ndarray
    relative: np.ndarray  # lung area relative to the series' largest


def select_series(
    series: Series,
    window_width: float,
    window_level: float,
    air_hu: float = AIR_HU,
    min_lung_fraction: float = MIN_LUNG_FRACTION,
    progress: Callable[[int], object] | None = None,
) -> SeriesSelection:
    """Read each slice's HU once, for both its lung area and its windowed image, then keep the
    slices whose lung area is at least ``min_lung_fraction`` of the series' largest."""
    windowed, areas = [], []
    for header in series.slices:
        hu = read_hu(header)
        areas.append(lung_area(hu, air_hu))
        windowed.append(window(hu, window_width, window_level))
        if progress is not None:
            progress(1)
    keep, relative = select_slices(np.asarray(areas), min_lung_fraction)
    return SeriesSelection(windowed, np.asarray(areas, dtype=float), keep, relative)


NODULE_COUNTING = ("instance", "position")  # how a nodule's centre slice number counts


@dataclass(frozen=True)
class Nodule:
    """A nodule as a truth spreadsheet gives it: pixel x, y from (1, 1), a centre slice number."""

    number: int
    x: int
    y: int
    slice: int
    label: int
    diagnosis: str


@dataclass
class NoduleSelection:
    """Per slice of a series: within reach of a nodule or not, with that nodule's label; and the
    nodules' centre slices."""

    keep: np.ndarray
    labels: list[int | None]
    names: list[str]
    centres: dict[int, Nodule]  # slice index -> the nodule centred on it


def centre_index(series: Series, nodule: Nodule, counting: str) -> int:
    """The index (in the series' sorted order) of a nodule's centre slice: the slice whose DICOM
    InstanceNumber is the number (``instance``), or the number-th slice from one end
    (``position``, 1-based in the sorted order)."""
    if counting == "position":
        if not 1 <= nodule.slice <= len(series.slices):
            raise ValueError(
                f"nodule {nodule.number} of series {series.uid}: centre slice {nodule.slice} is "
                f"outside the series' 1..{len(series.slices)}"
            )
        return nodule.slice - 1
    numbers = [s.instance_number for s in series.slices]
    if nodule.slice not in numbers:
        raise ValueError(
            f"nodule {nodule.number} of series {series.uid}: no slice has InstanceNumber "
            f"{nodule.slice} (try nodule_counting=position)"
        )
    return numbers.index(nodule.slice)


def nodule_slices(
    series: Series, nodules: list[Nodule], reach_mm: float, counting: str = "instance"
) -> NoduleSelection:
    """The slices within ``reach_mm`` of a nodule's centre slice along the slice normal
    (millimetres, not slice counts, so thin and thick series give the same anatomy), labelled by
    that nodule's diagnosis; a slice near two nodules takes the nearer one's."""
    if series.ordering != "slice_normal":
        raise ValueError(
            f"series {series.uid} has no position tags: a distance in mm along the slice normal "
            "cannot be measured, so its nodule slices cannot be chosen"
        )
    positions = np.asarray(series.positions)
    distance = np.full(len(positions), np.inf)
    labels: list[int | None] = [None] * len(positions)
    names = [""] * len(positions)
    centres = {}
    for nodule in nodules:
        centre = centre_index(series, nodule, counting)
        centres[centre] = nodule
        away = np.abs(positions - positions[centre])
        for i in np.flatnonzero((away <= reach_mm) & (away < distance)):
            distance[i], labels[i], names[i] = away[i], nodule.label, nodule.diagnosis
    return NoduleSelection(np.isfinite(distance), labels, names, centres)
