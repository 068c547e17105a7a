"""Decoding CT slices into one grey channel, the same way for every image and every stage.

Grey comes first: in COVID-CT the PIL mode (RGBA, RGB, L) correlates with the class, so a
network fed the raw channels could learn the file format instead of the lungs.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from mstl.array_cache import ArrayCache, content_key, sha256_file
from mstl.data.preprocessing import Preprocessing


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
    """Decode an image file (or its bytes) to 8-bit grey, or raise ImageReadError naming it."""
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


def load_grey(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """One image as an (image_size, image_size) uint8 grey array (plain resize)."""
    return Preprocessing(image_size)(open_grey(path))


@dataclass
class DecodedImages:
    """Decoded slices, with the list of files that could not be read when skipping was asked for."""

    pixels: np.ndarray  # (n, size, size) uint8
    kept: list[int]  # indices into the requested paths
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    lung_field_missing: list[int] = field(default_factory=list)  # kept, but lung_crop left whole
    seconds: float = 0.0  # wall time of decoding (or of reading the cache)


def decode_images(
    paths: Sequence[str | os.PathLike],
    preprocessing: Preprocessing | int,
    skip_unreadable: bool = False,
    desc: str = "decoding",
    workers: int | None = None,
) -> DecodedImages:
    """Decode many images in threads (PIL releases the GIL), with a progress bar.

    An unreadable file raises ImageReadError unless ``skip_unreadable``; then it is left out and
    reported in ``unreadable`` so callers can log it. Nothing is dropped silently. ``preprocessing``
    is a :class:`Preprocessing` or, for the plain resize, an image size.
    """
    prepare = (
        preprocessing
        if isinstance(preprocessing, Preprocessing)
        else Preprocessing(int(preprocessing))
    )
    workers = workers or min(8, os.cpu_count() or 1)
    out = np.zeros((len(paths), prepare.image_size, prepare.image_size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    found = np.ones(len(paths), dtype=bool)
    unreadable: list[tuple[str, str]] = []

    def work(i: int) -> tuple[int, str | None]:
        try:
            out[i], found[i] = prepare.apply(open_grey(paths[i]))
            return i, None
        except ImageReadError as exc:
            if not skip_unreadable:
                raise
            return i, str(exc)

    with ThreadPoolExecutor(workers) as pool:
        for i, error in tqdm(
            pool.map(work, range(len(paths))),
            total=len(paths),
            desc=desc,
            unit="img",
            mininterval=2,
        ):
            if error is None:
                ok[i] = True
            else:
                unreadable.append((str(paths[i]), error))
    kept = np.flatnonzero(ok).tolist()
    return DecodedImages(out[ok], kept, unreadable, np.flatnonzero(ok & ~found).tolist())


def decode_images_cached(
    paths: Sequence[str | os.PathLike],
    preprocessing: Preprocessing,
    skip_unreadable: bool = False,
    cache: ArrayCache | None = None,
) -> DecodedImages:
    """``decode_images`` through ``cache`` when given, keyed by the files' SHA-256s and the
    preprocessing, so the runs of a grid decode a data set once. A set with an unreadable file is
    decoded afresh every time."""
    start = time.perf_counter()
    if cache is None:
        decoded = decode_images(paths, preprocessing, skip_unreadable)
        decoded.seconds = time.perf_counter() - start
        return decoded
    try:
        hashes = [sha256_file(p) for p in paths]
    except OSError:  # a missing file: decode_images names it (or skips it)
        return decode_images(paths, preprocessing, skip_unreadable)
    key = content_key(["decoded", json.dumps(preprocessing.config(), sort_keys=True), *hashes])
    pixels, missing = cache.load("decoded", key), cache.load("decoded", key + "-lung-field-missing")
    hit = pixels is not None and missing is not None and len(pixels) == len(paths)
    cache.count("decoded", hit)
    if hit:
        return DecodedImages(
            pixels, list(range(len(paths))), [], missing.tolist(), time.perf_counter() - start
        )
    decoded = decode_images(paths, preprocessing, skip_unreadable)
    if not decoded.unreadable:
        cache.store("decoded", key, decoded.pixels)
        cache.store(
            "decoded",
            key + "-lung-field-missing",
            np.asarray(decoded.lung_field_missing, dtype=np.int64),
        )
    decoded.seconds = time.perf_counter() - start
    return decoded
