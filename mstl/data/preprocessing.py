"""What happens to a grey slice between decoding and the network, written once and used by training,
`evaluate`, the served model and `explain`, so a model always sees its inputs prepared the same way.

Two optional steps against the shortcuts COVID-CT is known for (slices cut from papers, with text,
borders, arrows and scanner-specific grey levels that differ by class):

- ``lung_crop``: crop to the lung field's bounding box (the 8-bit lung field of
  :func:`mstl.dicom.selection.lung_mask_8bit`) plus ``LUNG_CROP_MARGIN`` of its size on every side,
  widened to a square so the anatomy keeps its aspect ratio, then resize. Captions, page borders and
  most of the outside air fall away. A slice in which no lung field is found is kept whole and
  counted (``lung_field_missing``), never dropped.
- ``lung_mask``: after the resize (and the intensity step), every pixel outside the lung field,
  widened by ``LUNG_MASK_DILATION`` of the image side to keep the pleura, is set to black. What
  the network reads is then the lungs alone: captions, borders, the heart, the mediastinum, the
  table and the arms are gone. Computed by the same function in training and in the served model.
  A slice without a lung field is kept whole and counted as with ``lung_crop``.
- ``intensity``: ``equalize`` (global histogram equalisation) or ``clahe`` (contrast-limited
  adaptive histogram equalisation, Zuiderveld 1994: 8x8 tiles, clip limit 2) after the resize, so
  grey levels no longer carry the scanner's or the paper's contrast settings.

Both intensity steps stay hand-written or Pillow's: scikit-image's ``equalize_adapthist`` stretches
each image to 14 bits and clips iteratively, so it gives other numbers (docs/choices.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

from mstl.dicom.selection import lung_mask_8bit

INTENSITIES = ("none", "clahe", "equalize")
LUNG_CROP_MARGIN = 0.1  # of the lung field's box, on every side: keeps the pleura and chest wall
MASK_SIDE = 256  # the lung field is found on a copy this wide: the box, not the outline, is used
LUNG_MASK_DILATION = 0.02  # of the image side: the pleura and subpleural ground glass stay in
CLAHE_TILES = 8
CLAHE_CLIP_LIMIT = 2.0  # times the mean bin count of a tile's histogram (OpenCV's convention)


def clahe(
    grey: np.ndarray, tiles: int = CLAHE_TILES, clip_limit: float = CLAHE_CLIP_LIMIT
) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a uint8 image: each tile's histogram is
    clipped at ``clip_limit`` times its mean bin count, the excess spread over all bins, and each
    pixel mapped through the bilinear blend of its four nearest tiles' cumulative histograms."""
    grey = np.asarray(grey, dtype=np.uint8)
    h, w = grey.shape
    th, tw = math.ceil(h / tiles), math.ceil(w / tiles)
    padded = np.pad(grey, ((0, th * tiles - h), (0, tw * tiles - w)), mode="reflect")
    blocks = (
        padded.reshape(tiles, th, tiles, tw).transpose(0, 2, 1, 3).reshape(tiles * tiles, th * tw)
    )
    offsets = (np.arange(tiles * tiles) * 256)[:, None]
    hist = (
        np.bincount((blocks + offsets).ravel(), minlength=tiles * tiles * 256)
        .reshape(tiles, tiles, 256)
        .astype(float)
    )
    limit = max(1.0, clip_limit * th * tw / 256)
    excess = np.clip(hist - limit, 0, None).sum(axis=-1, keepdims=True)
    hist = np.minimum(hist, limit) + excess / 256
    lut = np.cumsum(hist, axis=-1) * (255.0 / (th * tw))  # (tiles, tiles, 256)

    def axis(n: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        position = (np.arange(n) + 0.5) / size - 0.5  # in tile units, tile centres at integers
        low = np.clip(np.floor(position), 0, tiles - 1).astype(int)
        high = np.minimum(low + 1, tiles - 1)
        return low, high, np.clip(position - low, 0, 1)

    y0, y1, wy = axis(h, th)
    x0, x1, wx = axis(w, tw)
    wy, wx = wy[:, None], wx[None, :]
    y0, y1, x0, x1 = y0[:, None], y1[:, None], x0[None, :], x1[None, :]
    out = (1 - wy) * ((1 - wx) * lut[y0, x0, grey] + wx * lut[y0, x1, grey]) + wy * (
        (1 - wx) * lut[y1, x0, grey] + wx * lut[y1, x1, grey]
    )
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def lung_box(
    grey: Image.Image, margin: float = LUNG_CROP_MARGIN
) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the square crop around the lung field, or None without one."""
    width, height = grey.size
    scale = min(1.0, MASK_SIDE / max(width, height))
    small = (
        grey
        if scale == 1.0
        else grey.resize((max(1, round(width * scale)), max(1, round(height * scale))))
    )
    mask = lung_mask_8bit(np.asarray(small))
    if not mask.any():
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom = rows[0] / scale, (rows[-1] + 1) / scale
    left, right = cols[0] / scale, (cols[-1] + 1) / scale
    side = max(bottom - top, right - left) * (1 + 2 * margin)

    def span(centre: float, limit: int) -> tuple[int, int]:
        length = min(side, limit)  # square unless the image itself is narrower
        start = min(max(centre - length / 2, 0.0), limit - length)
        return round(start), round(start + length)

    x_start, x_end = span((left + right) / 2, width)
    y_start, y_end = span((top + bottom) / 2, height)
    return x_start, y_start, x_end, y_end


def normalise_intensity(pixels: np.ndarray, intensity: str) -> np.ndarray:
    """The ``intensity`` step on resized uint8 pixels."""
    if intensity == "equalize":
        return np.asarray(ImageOps.equalize(Image.fromarray(pixels, mode="L")), dtype=np.uint8)
    if intensity == "clahe":
        return clahe(pixels)
    return pixels


def mask_outside_lungs(pixels: np.ndarray, field: np.ndarray | None = None) -> np.ndarray | None:
    """The slice with everything outside its (slightly widened) lung field set to 0, or None
    when no lung field is found. ``field``: the pixels the field is found on (default: these)."""
    mask = lung_mask_8bit(pixels if field is None else field)
    if not mask.any():
        return None
    reach = max(1, round(LUNG_MASK_DILATION * max(mask.shape)))
    mask = ndimage.binary_dilation(mask, iterations=reach)
    return np.where(mask, pixels, 0).astype(np.uint8)


@dataclass(frozen=True)
class Preprocessing:
    """From a decoded 8-bit grey slice to the square uint8 array the network reads."""

    image_size: int
    lung_crop: bool = False
    intensity: str = "none"
    lung_mask: bool = False

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITIES:
            raise ValueError(
                f"unknown intensity {self.intensity!r}; use one of {', '.join(INTENSITIES)}"
            )
        if int(self.image_size) < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    def apply(self, grey: Image.Image) -> tuple[np.ndarray, bool]:
        """(pixels, lung field found); without ``lung_crop`` or ``lung_mask`` the second is always
        True."""
        found = True
        if self.lung_crop:
            box = lung_box(grey)
            found = box is not None
            if found:
                grey = grey.crop(box)
        resized = np.asarray(
            grey.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR),
            dtype=np.uint8,
        )
        pixels = normalise_intensity(resized, self.intensity)
        if self.lung_mask:  # the field is found before the intensity step, as lung_crop finds it
            masked = mask_outside_lungs(pixels, resized)
            found = found and masked is not None
            pixels = pixels if masked is None else masked
        return pixels, found

    def __call__(self, grey: Image.Image) -> np.ndarray:
        return self.apply(grey)[0]

    def config(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> Preprocessing:
        """From a served model's config; models logged before these options existed used neither."""
        return cls(
            int(config["image_size"]),
            bool(config.get("lung_crop", False)),
            str(config.get("intensity", "none")),
            bool(config.get("lung_mask", False)),
        )
