"""Small synthetic CT series written with pydicom, for the edge cases real data rarely shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLSLossless, generate_uid


def phantom(size: int = 64, lungs: float = 1.0) -> np.ndarray:
    """Stored values (HU + 1024) of a body ellipse in air with two lungs scaled by ``lungs`` (0 =
    none)."""
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    hu = np.full((size, size), -1000.0)
    hu[(xx / 0.42) ** 2 + (yy / 0.32) ** 2 <= 1] = 40.0
    if lungs > 0:
        for cx in (-0.17, 0.17):
            hu[((xx - cx) / (0.12 * lungs)) ** 2 + (yy / (0.2 * lungs)) ** 2 <= 1] = -850.0
    return (hu + 1024).astype(np.uint16)


def write_slice(
    path: Path,
    series_uid: str,
    z: float | None,
    instance: int | None,
    pixels: np.ndarray | None = None,
    modality: str = "CT",
    transfer_syntax=ExplicitVRLittleEndian,
    orientation=(1, 0, 0, 0, 1, 0),
    patient_id: str = "SYN-001",
    study_uid: str = "1.2.3.4",
    pixel_data: bool = True,
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = "Doe^Jane"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    if instance is not None:
        ds.InstanceNumber = instance
    if z is not None:
        normal = np.cross(orientation[:3], orientation[3:])
        ds.ImagePositionPatient = [float(v) for v in (normal * z)]
        ds.ImageOrientationPatient = list(orientation)
    pixels = phantom() if pixels is None else pixels
    ds.Rows, ds.Columns = pixels.shape
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if not pixel_data:
        pass
    elif transfer_syntax == ExplicitVRLittleEndian:
        ds.PixelData = pixels.tobytes()
    else:
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\xd8not-really-jpeg-ls\xff\xd9"])
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    folder: Path, n: int = 12, series_uid: str | None = None, **kwargs
) -> tuple[str, list[Path]]:
    """A series from abdomen (no lungs) through the chest to the neck, written in shuffled file
    order."""
    series_uid = series_uid or generate_uid()
    lung_profile = np.sin(np.linspace(0, np.pi, n)) ** 2  # 0 at both ends, 1 mid-lung
    order = np.random.default_rng(0).permutation(n)
    paths = []
    for k in order:
        paths.append(
            write_slice(
                folder / f"IM{k:05d}",
                series_uid,
                z=5.0 * k,
                instance=int(k) + 1,
                pixels=phantom(lungs=float(lung_profile[k])),
                **kwargs,
            )
        )
    return series_uid, paths


JPEG_LS = JPEGLSLossless
