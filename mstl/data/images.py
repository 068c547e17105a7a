"""Decoding CT slices into one grey channel, the same way for every image and every stage.

Grey comes first: in COVID-CT the PIL mode (RGBA, RGB, L) correlates with the class, so a
network fed the raw channels could learn the file format instead of the lungs.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm


class ImageReadError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


def to_grey(image: Image.Image) -> Image.Image:
    """One 8-bit grey channel from any PIL mode (alpha dropped, 16-bit scaled down)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        scaled = np.zeros_like(array) if hi <= lo else (array - lo) * (255.0 / (hi - lo))
        return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA").convert("RGB")
    return image.convert("L")


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def open_grey(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Decode an image file (or its bytes) to an 8-bit grey PIL image, or raise ImageReadError naming it."""
    is_bytes = isinstance(source, (bytes, bytearray))
    name = name or ("image bytes" if is_bytes else str(source))
    try:
        size = len(source) if is_bytes else Path(source).stat().st_size
        if size == 0:
            raise ImageReadError(f"cannot read image {name}: the file is empty (0 bytes)")
        with Image.open(io.BytesIO(source) if is_bytes else source) as image:
            image.load()
            return to_grey(image)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"cannot read image {name}: no such file") from None
    except Exception as exc:  # PIL raises several types for corrupt data
        raise ImageReadError(f"cannot read image {name}: {type(exc).__name__}: {exc}") from exc


def resize_grey(grey: Image.Image, image_size: int) -> np.ndarray:
    """The one resize every stage and the served model use: square, bilinear, no crop."""
    return np.asarray(grey.resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.uint8)


def load_grey(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Read one image as a (image_size, image_size) uint8 grey array, or raise ImageReadError."""
    return resize_grey(open_grey(path), image_size)


@dataclass
class DecodedImages:
    """Decoded slices, with the list of files that could not be read when skipping was asked for."""

    pixels: np.ndarray  # (n, size, size) uint8
    kept: list[int]  # indices into the requested paths
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def decode_images(
    paths: Sequence[str | os.PathLike],
    image_size: int,
    skip_unreadable: bool = False,
    desc: str = "decoding",
    workers: int | None = None,
) -> DecodedImages:
    """Decode many images in threads (PIL releases the GIL), with a progress bar.

    An unreadable file raises ImageReadError unless ``skip_unreadable``; then it is left out
    and reported in ``unreadable`` so callers can log it. Nothing is dropped silently.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    out = np.zeros((len(paths), image_size, image_size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    unreadable: list[tuple[str, str]] = []

    def work(i: int) -> tuple[int, str | None]:
        try:
            out[i] = load_grey(paths[i], image_size)
            return i, None
        except ImageReadError as exc:
            if not skip_unreadable:
                raise
            return i, str(exc)

    with ThreadPoolExecutor(workers) as pool:
        for i, error in tqdm(pool.map(work, range(len(paths))), total=len(paths), desc=desc, unit="img", mininterval=2):
            if error is None:
                ok[i] = True
            else:
                unreadable.append((str(paths[i]), error))
    kept = np.flatnonzero(ok).tolist()
    return DecodedImages(out[ok], kept, unreadable)


def grey_to_input(grey_batch, preprocess_input):
    """uint8 grey (n, h, w) -> the backbone's float input (n, h, w, 3), via its own ``preprocess_input``."""
    import tensorflow as tf

    x = tf.cast(grey_batch, tf.float32)[..., None]
    x = tf.repeat(x, 3, axis=-1)
    return preprocess_input(x)
