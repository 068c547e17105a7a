"""Reading DICOM CT as TCIA delivers it: any file name, grouped by series, ordered along the slice
normal.

Every file is tried with pydicom; what cannot be used is skipped with a reason that is reported,
never dropped silently.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class SliceHeader:
    path: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    shape: tuple[int, int]
    slope: float
    intercept: float


@dataclass
class Series:
    uid: str
    patient_id: str
    study_uid: str
    slices: list[SliceHeader]  # ordered from one end of the scan to the other
    ordering: str  # "slice_normal" or "instance_number"
    positions: list[float]  # along the slice normal (or the instance number)


@dataclass
class ScanResult:
    series: list[Series]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    non_dicom: int = 0
    files: int = 0


def missing_decoder(ds: pydicom.Dataset) -> str | None:
    """For a compressed transfer syntax with no usable decoder, say which packages decode it."""
    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if uid is None or not uid.is_compressed:
        return None
    try:
        decoder = get_decoder(uid)
    except (NotImplementedError, ValueError):
        return f"compressed transfer syntax {uid.name} ({uid}) has no pixel decoder in pydicom"
    if decoder.is_available:
        return None
    needs = "; or ".join(decoder.missing_dependencies) or "a plugin"
    return (
        f"compressed transfer syntax {uid.name} ({uid}) needs a decoder that is not installed: "
        f"{needs}"
    )


def read_header(path: Path) -> SliceHeader | str:
    """A usable CT slice's header, or why it cannot be used; InvalidDicomError if not DICOM."""
    ds = pydicom.dcmread(path, defer_size="1 KB")  # pixel data stays on disk until needed
    modality = str(ds.get("Modality", "")).upper()
    if modality != "CT":
        return f"modality {modality or 'missing'} is not CT"
    if "PixelData" not in ds:
        return "no pixel data"
    reason = missing_decoder(ds)
    if reason:
        return reason
    for tag in ("SeriesInstanceUID", "SOPInstanceUID", "Rows", "Columns"):
        if tag not in ds:
            return f"missing {tag}"
    position = ds.get("ImagePositionPatient")
    orientation = ds.get("ImageOrientationPatient")
    instance = ds.get("InstanceNumber")
    has_position = (
        position is not None
        and orientation is not None
        and len(position) == 3
        and len(orientation) == 6
    )
    if not has_position and instance in (None, ""):
        return (
            "missing position tags "
            "(ImagePositionPatient/ImageOrientationPatient and InstanceNumber)"
        )
    return SliceHeader(
        path=str(path),
        patient_id=str(ds.get("PatientID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.SOPInstanceUID),
        instance_number=int(instance) if instance not in (None, "") else None,
        position=tuple(float(v) for v in position) if has_position else None,
        orientation=tuple(float(v) for v in orientation) if has_position else None,
        shape=(int(ds.Rows), int(ds.Columns)),
        slope=rescale_slope(ds),  # recorded for the manifest; dataset_hu applies them
        intercept=rescale_intercept(ds),
    )


def order_series(
    slices: list[SliceHeader],
) -> tuple[list[SliceHeader], str, list[float], list[tuple[str, str]]]:
    """Sort by position along the slice normal (IOP row x column), else by InstanceNumber.

    Slices without position tags in a series where others have them are skipped; so are slices
    whose shape differs from the series' most common shape.
    """
    skipped: list[tuple[str, str]] = []
    shape = Counter(s.shape for s in slices).most_common(1)[0][0]
    kept = []
    for s in slices:
        if s.shape != shape:
            skipped.append((s.path, f"slice shape {s.shape} differs from the series' {shape}"))
        else:
            kept.append(s)
    with_position = [s for s in kept if s.position is not None]
    if with_position:
        for s in kept:
            if s.position is None:
                skipped.append(
                    (s.path, "missing position tags (ImagePositionPatient/ImageOrientationPatient)")
                )
        orientation = np.asarray(with_position[0].orientation)
        normal = np.cross(orientation[:3], orientation[3:])
        keyed = sorted(with_position, key=lambda s: float(np.dot(normal, s.position)))
        return keyed, "slice_normal", [float(np.dot(normal, s.position)) for s in keyed], skipped
    keyed = sorted(kept, key=lambda s: s.instance_number)
    return keyed, "instance_number", [float(s.instance_number) for s in keyed], skipped


def scan(root: str | os.PathLike, progress=None) -> ScanResult:
    """Read every file under ``root`` (no extension needed) and group usable CT slices by series."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dicom_root is not a folder: {root}")
    result = ScanResult(series=[])
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    result.files = len(paths)
    iterator = progress(paths) if progress else paths
    for path in iterator:
        try:
            header = read_header(path)
        except (InvalidDicomError, EOFError, OSError, KeyError, ValueError, AttributeError) as exc:
            if (
                isinstance(exc, InvalidDicomError)
                or "DICM" in str(exc)
                or isinstance(exc, EOFError)
            ):
                result.non_dicom += 1
            else:
                result.skipped.append((str(path), f"unreadable DICOM: {type(exc).__name__}: {exc}"))
            continue
        if isinstance(header, str):
            result.skipped.append((str(path), header))
        else:
            groups[header.series_uid].append(header)
    for uid, slices in sorted(groups.items()):
        ordered, how, positions, skipped = order_series(slices)
        result.skipped.extend(skipped)
        if ordered:
            result.series.append(
                Series(uid, ordered[0].patient_id, ordered[0].study_uid, ordered, how, positions)
            )
    return result


def rescale_slope(ds: pydicom.Dataset) -> float:
    """RescaleSlope (0028,1053); 1 when missing or empty."""
    return float(ds.get("RescaleSlope", 1) or 1)


def rescale_intercept(ds: pydicom.Dataset) -> float:
    """RescaleIntercept (0028,1052); 0 when missing or empty."""
    return float(ds.get("RescaleIntercept", 0) or 0)


def modality_lut(ds: pydicom.Dataset) -> pydicom.Dataset:
    """What pydicom's Modality LUT stage reads: ``ds`` itself when it has a Modality LUT Sequence,
    else its two rescale values, 1 and 0 standing in for a missing or empty tag (pydicom would
    skip the rescale, or fail on an empty value)."""
    if ds.get("ModalityLUTSequence"):
        return ds
    rescale = pydicom.Dataset()
    rescale.RescaleSlope = rescale_slope(ds)
    rescale.RescaleIntercept = rescale_intercept(ds)
    return rescale


def dataset_hu(ds: pydicom.Dataset) -> np.ndarray:
    """Hounsfield units as float32 through ``pydicom.pixels.apply_modality_lut``: stored value x
    RescaleSlope + RescaleIntercept (or the Modality LUT Sequence), computed in float64."""
    return apply_modality_lut(ds.pixel_array, modality_lut(ds)).astype(np.float32)


def read_hu(header: SliceHeader) -> np.ndarray:
    """A slice's Hounsfield units (see :func:`dataset_hu`)."""
    return dataset_hu(pydicom.dcmread(header.path))


def window(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """Map HU to 8 bits through a window (e.g. the lung window W1500/L-600)."""
    if width <= 0:
        raise ValueError(f"window_width must be positive, got {width}")
    low = level - width / 2
    scaled = (hu - low) * (255.0 / width)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)
