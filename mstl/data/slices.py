"""Folders of already-exported 2-D CT slices (PNG/JPG) whose class sub-folders are the labels.

Such sets (IQ-OTH/NCCD, or the paper's own JPG export) have no patient IDs, and neighbouring slices
of one patient are near-identical. Exact duplicates are found by content hash and kept once;
near-duplicates are grouped by a perceptual difference hash into pseudo-patients, so an 80:20
split grouped by them keeps a patient's neighbouring slices on one side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from mstl.array_cache import sha256_file
from mstl.data.images import IMAGE_SUFFIXES

DROP = "drop"


def parse_label_map(text: str) -> dict[str, str]:
    """``"Malignant cases=1,Bengin cases=0,Normal cases=drop"`` -> {folder or value: label}."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in str(text or "").split(","))):
        if "=" not in item:
            raise ValueError(f"label_map entry {item!r} is not name=label (e.g. 'malignant=1')")
        key, value = (x.strip() for x in item.rsplit("=", 1))
        mapping[key.lower()] = value
    return mapping


@dataclass
class SliceFolder:
    """What was found under ``slices_root``: usable images, their labels, everything left out."""

    files: list[Path]
    labels: list[str]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (kept, duplicate)


def scan_slice_folder(root: str | Path, label_map: dict[str, str]) -> SliceFolder:
    """Class folders -> labels (through ``label_map`` when given), exact duplicates kept once."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"slices_root is not a folder: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"slices_root {root} has no class sub-folders")
    unknown = set(label_map) - {f.name.lower() for f in folders}
    if unknown:
        raise ValueError(
            f"label_map names folder(s) {sorted(unknown)} not found in {root}; folders: "
            f"{[f.name for f in folders]}"
        )
    files, labels, skipped, duplicates = [], [], [], []
    seen: dict[str, Path] = {}
    for folder in folders:
        label = label_map.get(folder.name.lower(), folder.name) if label_map else folder.name
        for path in sorted(folder.rglob("*"), key=lambda p: natural_key(p.name)):
            if not path.is_file():
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((str(path), f"not an image file ({path.suffix or 'no extension'})"))
                continue
            if label == DROP:
                continue
            digest = sha256_file(path)
            if digest in seen:
                duplicates.append((str(seen[digest]), str(path)))
                continue
            seen[digest] = path
            files.append(path)
            labels.append(label)
    classes = sorted(set(labels))
    return SliceFolder(files, labels, classes, skipped, duplicates)


def natural_key(name: str) -> list:
    """'case (10)' after 'case (9)'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


HASH_SIDE = 16  # 16 x 16 = 256-bit difference hash
# at most ~9 % of the 256 bits differ: measured on IQ-OTH/NCCD, docs/transition.md
NEAR_DUPLICATE_BITS = 24


def difference_hash(grey: Image.Image, side: int = HASH_SIDE) -> np.ndarray:
    """dHash: signs of horizontal gradients on a (side+1) x side thumbnail, packed to bytes."""
    small = np.asarray(grey.resize((side + 1, side), Image.Resampling.LANCZOS), dtype=np.int16)
    return np.packbits((small[:, 1:] > small[:, :-1]).ravel())


def group_near_duplicates(
    hashes: np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS, chunk: int = 256
) -> np.ndarray:
    """A group id per slice: connected components of slices whose hashes differ in at most
    ``max_bits`` bits."""
    hashes = np.asarray(hashes, dtype=np.uint8)
    n = len(hashes)
    rows, cols = [], []
    for start in range(0, n, chunk):
        block = hashes[start : start + chunk]
        differing = np.bitwise_xor(block[:, None, :], hashes[None, :, :])
        distance = np.bitwise_count(differing).sum(axis=2, dtype=np.int64)
        i, j = np.nonzero(distance <= max_bits)
        rows.append(i + start)
        cols.append(j)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # number groups in order of first appearance, so ids are stable for a given file order
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(np.argsort(first))
    return order[labels]


def check_two_classes(labels: pd.Series, origin: str) -> None:
    """A hard (supervised) Transition task needs at least two classes."""
    present = sorted(labels.dropna().unique().tolist())
    if len(present) < 2:
        which = f"only class {present[0]!r}" if present else "no labelled slice"
        raise ValueError(
            f"the hard task has a single class: {which} in {origin}. A hard Transition needs two "
            "classes (e.g. benign and malignant, or tumour and no tumour slice labels); use slice "
            "labels, add negatives, or use strategy=soft"
        )
