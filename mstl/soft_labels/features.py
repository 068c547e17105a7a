"""CNN features of Transition slices for clustering: the flattened output of an ImageNet conv base
(InceptionV3 at 224 px gives 5 x 5 x 2048 = 51,200 values per slice, as in the paper).

Computed once, in batches, with a progress bar, and cached on disk keyed by the slices' content and
the extractor, so every trial and every rerun with the same inputs reuses them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from mstl.data.images import load_grey
from mstl.data.pipeline import grey_to_input
from mstl.models.backbones import check_image_size, get_backbone, resolve_weights


def features_key(files: list[Path], backbone: str, weights: str, image_size: int) -> str:
    digest = hashlib.sha256(f"{backbone}|{weights}|{image_size}|v1".encode())
    for path in files:
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()[:32]


def extract_features(
    files: list[Path], backbone: str, weights: str, image_size: int, batch_size: int = 32
) -> np.ndarray:
    """(n, d) float32: each slice decoded to grey, replicated to 3 channels, the backbone's own
    preprocessing, the conv base, flattened."""
    spec = get_backbone(backbone)
    check_image_size(spec, image_size)
    base = spec.build(resolve_weights(weights), image_size)
    d = int(np.prod(base.output_shape[1:]))
    out = np.empty((len(files), d), dtype=np.float32)
    with tqdm(total=len(files), desc=f"{backbone} features", unit="slice", mininterval=2) as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            grey = np.stack([load_grey(f, image_size) for f in chunk])
            x = grey_to_input(tf.constant(grey), spec.preprocess_input)
            out[start : start + len(chunk)] = np.asarray(base(x, training=False)).reshape(
                len(chunk), d
            )
            bar.update(len(chunk))
    return out


def cached_features(
    files: list[Path],
    backbone: str,
    weights: str,
    image_size: int,
    cache_dir: str | os.PathLike,
    batch_size: int = 32,
) -> tuple[np.ndarray, Path, bool]:
    """Features from the cache when present, else computed and stored (atomically). Returns (X,
    path, reused)."""
    key = features_key(files, backbone, weights, image_size)
    path = Path(cache_dir).resolve() / f"{key}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r"), path, True
    features = extract_features(files, backbone, weights, image_size, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, features)
    os.replace(tmp, path)
    return features, path, False
