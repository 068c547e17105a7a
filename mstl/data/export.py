"""The Transition export behind prepare_transition: DICOM CT studies (or folders of 2-D slices) in;
a folder of selected, windowed lung slices with a manifest, labels, montages and the list of
everything left out, out.

An export is keyed by a hash of the input files' contents and the parameters that shape it, so the
same input is exported once. It is written to a temporary folder and renamed into place at the end,
so an interrupted export never leaves a half-written manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from mstl import defaults
from mstl.array_cache import sha256_file
from mstl.data.images import ImageReadError, open_grey
from mstl.data.montage import montage
from mstl.data.slices import (
    DROP,
    NEAR_DUPLICATE_BITS,
    SliceFolder,
    check_two_classes,
    difference_hash,
    group_near_duplicates,
    parse_label_map,
    scan_slice_folder,
)
from mstl.dicom.selection import (
    AIR_HU,
    MIN_LUNG_FRACTION,
    Nodule,
    NoduleSelection,
    SeriesSelection,
    nodule_slices,
    select_series,
)
from mstl.dicom.series import ScanResult, Series, SliceHeader, scan

EXPORT_VERSION = "1"  # bump when the export's content for the same input changes
MONTAGE_MAX = 60  # slices shown per series montage (evenly spaced)
CLASS_THUMBS = 24  # slices shown per class montage of a slice folder
IMAGE_FORMATS = ("png", "jpg")
DEFAULT_LABEL_MAP = {"benign": "0", "malignant": "1", "0": "0", "1": "1"}
LABEL_KEYS = ("sop_instance_uid", "series_instance_uid", "patient_id")  # most specific first
MANIFEST_COLUMNS = [
    "file",
    "patient_id",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "instance_number",
    "slice_position",
    "lung_fraction",
    "lung_area",
    "source_sha256",
    "label",
    "label_name",
    "selection",  # lung (lung-field selection) or nodule (within nodule_mm of a nodule's centre)
]
SELECTIONS = ("lung", "nodule", "lung+nodule")
Labels = tuple[str, dict[str, tuple[int | None, str]]]  # key column, {key: (label, label name)}


@dataclass(frozen=True)
class ExportSpec:
    """What an export is made from and what shapes it (the inputs enter its key by content, the
    rest by value)."""

    dicom_root: str = ""
    slices_root: str = ""
    labels_csv: str = ""
    label_map: str = ""
    window_width: float = defaults.WINDOW_WIDTH
    window_level: float = defaults.WINDOW_LEVEL
    min_lung_fraction: float = MIN_LUNG_FRACTION
    air_hu: float = AIR_HU
    image_format: str = "png"
    group_near_duplicates: bool = True
    near_duplicate_bits: int = NEAR_DUPLICATE_BITS
    selection: str = "lung"
    nodules_csv: str = ""  # series_instance_uid, nodule, x, y, slice, label, diagnosis per nodule
    nodule_mm: float = 10.0  # reach along the slice normal on each side of a nodule's centre slice
    nodule_counting: str = "instance"  # the centre slice number is the InstanceNumber, or position


INPUTS = ("dicom_root", "slices_root", "labels_csv", "nodules_csv")  # hashed by content


@dataclass
class Export:
    folder: Path
    manifest: pd.DataFrame
    summary: dict
    reused: bool


def export_key(spec: ExportSpec) -> str:
    """Hash of every input file's path and content, the labels file and the parameters that shape
    the export: a changed input is a new export, an unchanged one is found again."""
    root = Path(spec.dicom_root or spec.slices_root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{'dicom_root' if spec.dicom_root else 'slices_root'} is not a folder: {root}"
        )
    digest = hashlib.sha256(EXPORT_VERSION.encode())
    shaping = {f.name: getattr(spec, f.name) for f in fields(ExportSpec) if f.name not in INPUTS}
    digest.update(json.dumps(shaping, sort_keys=True).encode())
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for path in tqdm(files, desc="hashing input", unit="file", mininterval=2):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(bytes.fromhex(sha256_file(path)))
    for table in (spec.labels_csv, spec.nodules_csv):
        if table:
            digest.update(bytes.fromhex(sha256_file(Path(table))))
    return digest.hexdigest()[:32]


def build_export(spec: ExportSpec, export_dir: str | os.PathLike) -> Export:
    """Export once per distinct input; a finished export with the same key is reused as it is."""
    key = export_key(spec)
    final = Path(export_dir).resolve() / key
    if (final / "manifest.csv").is_file():
        summary = json.loads((final / "summary.json").read_text())
        return Export(final, pd.read_csv(final / "manifest.csv"), summary, reused=True)
    tmp = final.with_name(f".{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest, summary = (export_dicom if spec.dicom_root else export_slices)(spec, tmp)
        summary["export_key"] = key
        manifest.to_csv(tmp / "manifest.csv", index=False)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        if final.exists():  # a concurrent run finished first: keep its export
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Export(final, pd.read_csv(final / "manifest.csv"), summary, reused=False)


def read_labels(labels_csv: str, label_map: str) -> Labels | None:
    """(key column, {key: (label or None for drop, label name)}) from ``labels_csv``."""
    if not labels_csv:
        return None
    table = pd.read_csv(labels_csv, dtype=str)
    key = next((k for k in LABEL_KEYS if k in table.columns), None)
    if key is None or "label" not in table.columns:
        raise ValueError(
            f"labels_csv {labels_csv} needs a 'label' column and one of {LABEL_KEYS}; has "
            f"{list(table.columns)}"
        )
    mapping = {**DEFAULT_LABEL_MAP, **parse_label_map(label_map)}
    out: dict[str, tuple[int | None, str]] = {}
    for k, name in zip(table[key].str.strip(), table["label"].str.strip(), strict=False):
        value = mapping.get(name.lower())
        if value is None:
            raise ValueError(
                f"label {name!r} in {labels_csv} is not in label_map; known: "
                f"{sorted(mapping)} (e.g. label_map='{name}=1')"
            )
        out[k] = (None if value == DROP else int(value), name)
    return key, out


def read_nodules(nodules_csv: str) -> dict[str, list[Nodule]]:
    """Nodules by series UID, from a CSV such as `python -m mstl.data.download spie-aapm` writes."""
    if not nodules_csv:
        return {}
    table = pd.read_csv(nodules_csv, dtype={"series_instance_uid": str, "diagnosis": str})
    needed = {"series_instance_uid", "nodule", "x", "y", "slice", "label", "diagnosis"}
    if needed - set(table.columns):
        raise ValueError(
            f"nodules_csv {nodules_csv} lacks column(s) {sorted(needed - set(table.columns))}"
        )
    out: dict[str, list[Nodule]] = {}
    for row in table.itertuples():
        nodule = Nodule(int(row.nodule), int(row.x), int(row.y), int(row.slice), int(row.label),
                        str(row.diagnosis))  # fmt: skip
        out.setdefault(str(row.series_instance_uid).strip(), []).append(nodule)
    return out


def slice_label(header: SliceHeader, labels: Labels | None) -> tuple[int | None, str] | None:
    """(label, label name) of a slice: (None, "") when labels_csv does not name it, None when
    label_map drops it."""
    if labels is None:
        return None, ""
    column, mapping = labels
    key = {
        "sop_instance_uid": header.sop_uid,
        "series_instance_uid": header.series_uid,
        "patient_id": header.patient_id,
    }[column]
    if key not in mapping:
        return None, ""
    label, name = mapping[key]
    return None if label is None else (label, name)


def write_skipped(skipped: list[tuple[str, str]], folder: Path) -> None:
    """skipped.csv (logged: content hash and reason, no names) and skipped_paths.csv (local
    only): names of source files can carry PHI."""
    hashed = [(sha256_file(Path(p)) if Path(p).is_file() else "", reason) for p, reason in skipped]
    pd.DataFrame(hashed, columns=["source_sha256", "reason"]).to_csv(
        folder / "skipped.csv", index=False
    )
    pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(
        folder / "skipped_paths.csv", index=False
    )


def save_slice(pixels: np.ndarray, path: Path, image_format: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels, mode="L")
    if image_format == "png":
        image.save(path, compress_level=1)
    else:
        image.save(path, quality=95)


SubmitSlice = Callable[[np.ndarray, Path, str], None]


@contextmanager
def slice_writer() -> Iterator[SubmitSlice]:
    """Write slices in threads while the next series is read (PNG/JPEG encoding releases the GIL);
    on leaving, every write has finished, and the first error is re-raised."""
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
    pending = []

    def submit(pixels: np.ndarray, path: Path, image_format: str) -> None:
        pending.append(pool.submit(save_slice, pixels, path, image_format))

    try:
        yield submit
        for future in pending:
            future.result()
    finally:
        pool.shutdown(cancel_futures=True)


def export_dicom(spec: ExportSpec, folder: Path) -> tuple[pd.DataFrame, dict]:
    """Every CT series under ``dicom_root``: windowed, lung-selected, labelled slices and a
    montage per series (see :func:`export_series`)."""
    scanned: ScanResult = scan(
        spec.dicom_root,
        progress=lambda it: tqdm(it, desc="reading DICOM headers", unit="file", mininterval=2),
    )
    labels = read_labels(spec.labels_csv, spec.label_map)
    nodules = read_nodules(spec.nodules_csv)
    rows, series_rows = [], []
    total = sum(len(s.slices) for s in scanned.series)
    bar = tqdm(total=total, desc="HU, lung selection, export", unit="slice", mininterval=2)
    (folder / "montages").mkdir(exist_ok=True)
    with slice_writer() as submit:
        for k, series in enumerate(scanned.series):
            chosen = select_series(
                series,
                spec.window_width,
                spec.window_level,
                spec.air_hu,
                spec.min_lung_fraction,
                progress=bar.update,
            )
            near = near_nodules(series, nodules, spec)
            rows += export_series(
                k, series, chosen, near, labels, spec.image_format, folder, submit, spec.selection
            )
            series_rows.append(series_row(k, series, chosen))
            series_montage(k, series, chosen, spec.min_lung_fraction, near).save(
                folder / "montages" / f"s{k:03d}.png"
            )
    bar.close()
    if not rows:
        raise nothing_usable(spec.dicom_root, scanned)
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    if labels is not None:
        check_two_classes(manifest["label"], spec.labels_csv)
    pd.DataFrame(series_rows).to_csv(folder / "series.csv", index=False)
    write_skipped(scanned.skipped, folder)
    summary = {
        "n_files": scanned.files,
        "n_non_dicom": scanned.non_dicom,
        "n_skipped": len(scanned.skipped),
        "n_series": len(scanned.series),
        "n_slices": total,
        "n_kept": len(manifest),
        "n_labelled": int(manifest["label"].notna().sum()),
    }
    return manifest, summary


def near_nodules(
    series: Series, nodules: dict[str, list[Nodule]], spec: ExportSpec
) -> NoduleSelection | None:
    """The series' nodule slices when the selection uses nodules and the series has any."""
    if "nodule" not in spec.selection or series.uid not in nodules:
        return None
    return nodule_slices(series, nodules[series.uid], spec.nodule_mm, spec.nodule_counting)


def kept_label(
    i: int, header: SliceHeader, chosen: SeriesSelection, near: NoduleSelection | None,
    labels: Labels | None, selection: str,
) -> tuple[int | None, str, str] | None:  # fmt: skip
    """(label, label name, which selection kept it) of slice ``i``, None when no selection keeps
    it or label_map drops it. A nodule slice takes its nodule's diagnosis."""
    if near is not None and near.keep[i]:
        return near.labels[i], near.names[i], "nodule"
    if "lung" not in selection or not chosen.keep[i]:
        return None
    labelled = slice_label(header, labels)
    return None if labelled is None else (*labelled, "lung")


def export_series(
    k: int,
    series: Series,
    chosen: SeriesSelection,
    near: NoduleSelection | None,
    labels: Labels | None,
    image_format: str,
    folder: Path,
    submit: SubmitSlice,
    selection: str = "lung",
) -> list[dict]:
    """Queue the kept slices of series ``k`` for writing; their manifest rows. File names are
    numbers, never a patient's name."""
    rows = []
    for i, (header, pixels) in enumerate(zip(series.slices, chosen.windowed, strict=False)):
        labelled = kept_label(i, header, chosen, near, labels, selection)
        if labelled is None:
            continue  # not selected, or label_map drops it
        rel = f"slices/s{k:03d}/{i:04d}.{image_format}"
        submit(pixels, folder / rel, image_format)
        rows.append(
            {
                "file": rel,
                "patient_id": header.patient_id,
                "study_instance_uid": header.study_uid,
                "series_instance_uid": header.series_uid,
                "sop_instance_uid": header.sop_uid,
                "instance_number": header.instance_number,
                "slice_position": series.positions[i],
                "lung_fraction": round(float(chosen.relative[i]), 4),
                "lung_area": round(float(chosen.areas[i]), 5),
                "source_sha256": sha256_file(Path(header.path)),
                "label": labelled[0],
                "label_name": labelled[1],
                "selection": labelled[2],
            }
        )
    return rows


def series_row(k: int, series: Series, chosen: SeriesSelection) -> dict:
    """series.csv's row: how many slices series ``k`` has, how many were kept, and how they were
    ordered."""
    return {
        "series": f"s{k:03d}",
        "series_instance_uid": series.uid,
        "patient_id": series.patient_id,
        "n_slices": len(series.slices),
        "n_kept": int(chosen.keep.sum()),
        "ordering": series.ordering,
    }


def series_montage(
    k: int,
    series: Series,
    chosen: SeriesSelection,
    min_lung_fraction: float,
    near: NoduleSelection | None = None,
) -> Image.Image:
    """Up to MONTAGE_MAX evenly spaced slices of series ``k``, kept ones framed green, rejected
    ones red, so the selection can be checked by eye; a nodule's centre slice is always shown, with
    a ring at the nodule and its slices framed blue."""
    windowed, keep, relative = list(chosen.windowed), chosen.keep, chosen.relative
    centres = near.centres if near is not None else {}
    shown = np.unique(
        np.concatenate(
            [np.linspace(0, len(windowed) - 1, min(len(windowed), MONTAGE_MAX)), list(centres)]
        )
        .round()
        .astype(int)
    )
    for i, nodule in centres.items():
        windowed[i] = ringed(windowed[i], nodule.x - 1, nodule.y - 1)
    nodule_keep = near.keep if near is not None else np.zeros(len(keep), bool)
    title = (
        f"series s{k:03d}: {int(keep.sum())}/{len(keep)} kept (green), rejected (red) "
        f"at min_lung_fraction={min_lung_fraction}"
    )
    if len(shown) != len(windowed):
        title += f"; {len(shown)} of {len(windowed)} slices shown"
    return montage(
        [windowed[i] for i in shown],
        [
            f"{series.positions[i]:.0f} mm\n"
            + (f"nodule {centres[i].number}" if i in centres else f"f={relative[i]:.2f}")
            for i in shown
        ],
        columns=10,
        title=title,
        colors=["blue" if nodule_keep[i] else "green" if keep[i] else "red" for i in shown],
    )


def ringed(grey: np.ndarray, x: int, y: int, radius: int = 14) -> np.ndarray:
    """A copy of a slice with a white ring around (x, y): where the truth puts the nodule."""
    rows, cols = np.ogrid[: grey.shape[0], : grey.shape[1]]
    ring = np.abs(np.hypot(cols - x, rows - y) - radius) < 1.5
    out = np.array(grey, copy=True)
    out[ring] = 255
    return out


def nothing_usable(root: str, scanned: ScanResult) -> ValueError:
    """The error for a DICOM root that gave no slice, with the most common reasons files were
    skipped."""
    reasons = pd.Series([r for _, r in scanned.skipped]).value_counts().head(5).to_dict()
    return ValueError(
        f"nothing usable under {root}: {scanned.files} files, {scanned.non_dicom} not DICOM, "
        f"{len(scanned.skipped)} skipped (most common reasons: {reasons}), no slice kept"
    )


def export_slices(spec: ExportSpec, folder: Path) -> tuple[pd.DataFrame, dict]:
    """Folders of 2-D slices: grey copies, labels from the class folders, exact duplicates kept
    once and near-duplicates grouped into pseudo-patients (the set has no patient IDs)."""
    found = scan_slice_folder(spec.slices_root, parse_label_map(spec.label_map))
    to_int = class_numbers(found.labels)
    rows, hashes, skipped, thumbs = copy_slices(found, to_int, spec.image_format, folder)
    if not rows:
        raise ValueError(f"nothing usable under {spec.slices_root}: {len(skipped)} file(s) skipped")
    manifest = pd.DataFrame(rows)
    manifest["patient_id"] = pseudo_patients(np.stack(hashes), spec)
    for column in MANIFEST_COLUMNS:
        if column not in manifest:
            manifest[column] = None
    manifest = manifest[MANIFEST_COLUMNS]
    write_duplicates(found.duplicates, folder)
    write_skipped(skipped, folder)
    (folder / "montages").mkdir(exist_ok=True)
    for name, images in thumbs.items():
        sheet = montage(
            images,
            [""] * len(images),
            columns=8,
            title=f"class {name!r} (label {to_int[name]}): sample slices",
        )
        sheet.save(folder / "montages" / f"class_{to_int[name]}.png")
    summary = {
        "n_files": len(found.files) + len(found.duplicates) + len(found.skipped),
        "n_duplicates": len(found.duplicates),
        "n_skipped": len(skipped),
        "n_kept": len(manifest),
        "n_groups": int(manifest["patient_id"].nunique()),
        "n_classes": len(to_int),
    }
    return manifest, summary


def class_numbers(labels: list[str]) -> dict[str, int]:
    """Class name -> label: the number itself when every class is named by one, else the rank of
    the name in sorted order."""
    names = sorted(set(labels))
    numeric = all(n.lstrip("-").isdigit() for n in names)
    return {n: (int(n) if numeric else i) for i, n in enumerate(names)}


def copy_slices(
    found: SliceFolder, to_int: dict[str, int], image_format: str, folder: Path
) -> tuple[list[dict], list[np.ndarray], list[tuple[str, str]], dict[str, list[np.ndarray]]]:
    """Decode each slice to grey and save it under a number: (manifest rows, difference hashes,
    skipped files with reasons, a few slices per class for its montage)."""
    rows, hashes, skipped, thumbs = [], [], list(found.skipped), {}
    for path, name in tqdm(
        list(zip(found.files, found.labels, strict=False)),
        desc="grey, hash, export",
        unit="slice",
        mininterval=2,
    ):
        try:
            grey = open_grey(path)
        except ImageReadError as exc:
            skipped.append((str(path), str(exc)))
            continue
        rel = f"slices/{len(rows):05d}.{image_format}"
        pixels = np.asarray(grey, dtype=np.uint8)
        save_slice(pixels, folder / rel, image_format)
        hashes.append(difference_hash(grey))
        sample = thumbs.setdefault(name, [])
        if len(sample) < CLASS_THUMBS:
            sample.append(pixels)
        rows.append(
            {
                "file": rel,
                "source_sha256": sha256_file(path),
                "label": to_int[name],
                "label_name": name,
            }
        )
    return rows, hashes, skipped, thumbs


def pseudo_patients(hashes: np.ndarray, spec: ExportSpec) -> list[str]:
    """A group id per slice standing in for the patient: near-duplicates share one, so a grouped
    split keeps a patient's neighbouring slices on one side."""
    if spec.group_near_duplicates:
        groups = group_near_duplicates(hashes, spec.near_duplicate_bits)
        return [f"group-{g:05d}" for g in groups]
    warnings.warn(
        f"{spec.slices_root} has no patient IDs and group_near_duplicates is off: each slice is "
        "its own group, so near-identical neighbouring slices can fall on both sides of the split",
        stacklevel=2,
    )
    return [f"slice-{i:05d}" for i in range(len(hashes))]


def write_duplicates(duplicates: list[tuple[str, str]], folder: Path) -> None:
    """duplicates.csv (logged: content hashes, no names) and duplicates_paths.csv (local only):
    names of source files can carry PHI."""
    pd.DataFrame(
        [(sha256_file(Path(a)), sha256_file(Path(b))) for a, b in duplicates],
        columns=["kept_sha256", "duplicate_sha256"],
    ).to_csv(folder / "duplicates.csv", index=False)
    pd.DataFrame(duplicates, columns=["kept", "duplicate"]).to_csv(
        folder / "duplicates_paths.csv", index=False
    )
