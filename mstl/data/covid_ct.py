"""COVID-CT (UCSD-AI4H), the Target set: its index, patient IDs and the three splits.

Layout under ``data_root``::

    covid-ct/CT_COVID/*.png            349 images (34 are JPEG data with a .png name)
    covid-ct/CT_NonCOVID/*.{png,jpg}   397 images
    covid-ct/splits/{COVID,NonCOVID}/{train,val,test}CT_{COVID,NonCOVID}.txt
    covid-ct/meta/COVID-CT-MetaInfo.xlsx (or .csv), meta/NonCOVID-CT-MetaInfo.csv
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from mstl.array_cache import sha256_file
from mstl.data.images import IMAGE_SUFFIXES

DATASET_DIR = "covid-ct"
CLASSES = {"COVID": 1, "NonCOVID": 0}  # folder CT_<class>, label
SPLITS = ("train", "val", "test")
SPLIT_MODES = ("official", "paper", "patient")
# Table II of the paper: images per (class, split).
PAPER_COUNTS = {
    "COVID": {"train": 196, "val": 56, "test": 97},
    "NonCOVID": {"train": 251, "val": 56, "test": 90},
}
PATIENT_FRACTIONS = {"train": 0.60, "val": 0.15, "test": 0.25}


def dataset_dir(data_root: str | Path) -> Path:
    root = Path(data_root) / DATASET_DIR
    if not root.is_dir():
        raise FileNotFoundError(
            f"COVID-CT not found: {root} is not a folder (data_root={str(data_root)!r}; "
            "see docs/data.md, or `python -m mstl.data.download covid-ct --dest DATA_ROOT`)"
        )
    return root


def read_patient_ids(root: Path) -> dict[str, str]:
    """Map ``<class>/<file name>`` to patient ID from the dataset's own metadata files."""
    meta = root / "meta"
    ids: dict[str, str] = {}
    xlsx, csv = meta / "COVID-CT-MetaInfo.xlsx", meta / "COVID-CT-MetaInfo.csv"
    if xlsx.is_file():
        covid = pd.read_excel(xlsx, sheet_name=0, dtype=str)
    elif csv.is_file():
        covid = pd.read_csv(csv, dtype=str)
    else:
        raise FileNotFoundError(f"COVID-CT metadata not found: neither {xlsx} nor {csv} exists")
    for name, patient in zip(covid["File name"], covid["Patient ID"], strict=False):
        if isinstance(name, str) and isinstance(patient, str) and name.strip():
            name = name.strip()
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                name += ".png"  # 83 names in the xlsx lack the extension
            ids[f"COVID/{name}"] = patient.strip()
    noncovid_csv = meta / "NonCOVID-CT-MetaInfo.csv"
    if not noncovid_csv.is_file():
        raise FileNotFoundError(f"COVID-CT metadata not found: {noncovid_csv}")
    noncovid = pd.read_csv(noncovid_csv, dtype=str)
    for name, patient in zip(noncovid["image name"], noncovid["patient id"], strict=False):
        ids[f"NonCOVID/{name.strip()}"] = patient.strip()
    return ids


def index_images(data_root: str | Path, require_patients: bool = False) -> pd.DataFrame:
    """One row per image: file (relative to covid-ct/), path, class, label, patient_id."""
    root = dataset_dir(data_root)
    try:
        patients = read_patient_ids(root)
    except FileNotFoundError:
        if require_patients:
            raise
        patients = {}
    rows = []
    for cls, label in CLASSES.items():
        folder = root / f"CT_{cls}"
        if not folder.is_dir():
            raise FileNotFoundError(f"COVID-CT class folder not found: {folder}")
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                patient = patients.get(f"{cls}/{path.name}")
                if patient is None and require_patients:
                    raise ValueError(f"no patient ID for image {path} in {root / 'meta'}")
                rows.append(
                    {
                        "file": f"CT_{cls}/{path.name}",
                        "path": str(path),
                        "class": cls,
                        "label": label,
                        "patient_id": patient or "",
                    }
                )
    return pd.DataFrame(rows)


def official_split(index: pd.DataFrame, root: Path) -> pd.Series:
    split = pd.Series("", index=index.index, dtype=object)
    for cls in CLASSES:
        by_name = {
            Path(f).name: i
            for i, f in zip(index.index, index["file"], strict=False)
            if index.at[i, "class"] == cls
        }
        for part in SPLITS:
            list_file = root / "splits" / cls / f"{part}CT_{cls}.txt"
            if not list_file.is_file():
                raise FileNotFoundError(f"split file not found: {list_file}")
            names = [n.strip() for n in list_file.read_text().splitlines() if n.strip()]
            missing = [n for n in names if n not in by_name]
            if missing:
                raise ValueError(
                    f"split file {list_file} names {len(missing)} image(s) not in CT_{cls}/: "
                    f"{missing[:5]}"
                )
            for n in names:
                if split[by_name[n]]:
                    raise ValueError(
                        f"image {cls}/{n} is listed in two split files (second: {list_file})"
                    )
                split[by_name[n]] = part
    unassigned = index.loc[split == "", "file"].tolist()
    if unassigned:
        raise ValueError(
            f"{len(unassigned)} image(s) are in no official split file, e.g. {unassigned[:5]}"
        )
    return split


def paper_split(index: pd.DataFrame, seed: int) -> pd.Series:
    """A seeded random split with the exact per-class counts of the paper's Table II."""
    rng = np.random.default_rng(seed)
    split = pd.Series("", index=index.index, dtype=object)
    for cls, counts in PAPER_COUNTS.items():
        members = index.index[index["class"] == cls].to_numpy()
        if len(members) != sum(counts.values()):
            raise ValueError(
                f"the paper split needs {sum(counts.values())} {cls} images, found {len(members)}"
            )
        members = rng.permutation(members)
        start = 0
        for part in SPLITS:
            split[members[start : start + counts[part]]] = part
            start += counts[part]
    return split


def patient_split(
    index: pd.DataFrame, seed: int, fractions: dict[str, float] = PATIENT_FRACTIONS
) -> pd.Series:
    """A seeded 60:15:25 split by image count, stratified by class and grouped by patient."""
    if (index["patient_id"] == "").any():
        missing = index.loc[index["patient_id"] == "", "file"].tolist()
        raise ValueError(
            f"the patient split needs a patient ID for every image; missing for {missing[:5]}"
        )
    rng = np.random.default_rng(seed)
    split = pd.Series("", index=index.index, dtype=object)
    bounds = np.cumsum([fractions[p] for p in SPLITS])
    for cls in CLASSES:
        sub = index[index["class"] == cls]
        sizes = sub.groupby("patient_id").size()
        patients = rng.permutation(sizes.index.to_numpy())
        total, done = len(sub), 0
        for patient in patients:
            # each patient goes to the first split whose cumulative quota holds its midpoint
            mid = (done + sizes[patient] / 2) / total
            part = SPLITS[min(int(np.searchsorted(bounds, mid)), len(SPLITS) - 1)]
            split[sub.index[sub["patient_id"] == patient]] = part
            done += sizes[patient]
    return split


def load_split(data_root: str | Path, mode: str, seed: int = 0) -> pd.DataFrame:
    """The index with a ``split`` column for ``official``, ``paper`` or ``patient``."""
    if mode not in SPLIT_MODES:
        raise ValueError(f"unknown split {mode!r}; use one of {', '.join(SPLIT_MODES)}")
    index = index_images(data_root, require_patients=(mode == "patient"))
    if index.empty:
        raise ValueError(f"no images found under {dataset_dir(data_root)}")
    if mode == "official":
        index["split"] = official_split(index, dataset_dir(data_root))
    elif mode == "paper":
        index["split"] = paper_split(index, seed)
    else:
        index["split"] = patient_split(index, seed)
    return index


def split_table(index: pd.DataFrame) -> pd.DataFrame:
    """The columns of the split that identify it (no machine-specific paths), in a stable order."""
    return (
        index[["file", "class", "label", "patient_id", "split"]]
        .sort_values("file")
        .reset_index(drop=True)
    )


def split_sha256(index: pd.DataFrame) -> str:
    return hashlib.sha256(split_table(index).to_csv(index=False).encode()).hexdigest()


def file_sha256s(paths) -> list[str]:
    """The SHA-256 of each file's bytes, in the given order."""
    return [sha256_file(path) for path in paths]


def combined_sha256(hashes) -> str:
    """One hash over per-file hashes, in order (what ``files_sha256`` computes from the files)."""
    total = hashlib.sha256()
    for digest in hashes:
        total.update(bytes.fromhex(digest))
    return total.hexdigest()


def files_sha256(paths) -> str:
    """One hash over the bytes of every file, in the given order: the data a run actually saw."""
    return combined_sha256(file_sha256s(paths))
