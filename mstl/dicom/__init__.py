"""DICOM CT in: series grouping and ordering, HU, lung windowing, automated lung-slice
selection."""

from mstl.dicom.selection import lung_area, lung_mask, select_slices
from mstl.dicom.series import Series, SliceHeader, read_hu, scan, window

__all__ = [
    "Series",
    "SliceHeader",
    "lung_area",
    "lung_mask",
    "read_hu",
    "scan",
    "select_slices",
    "window",
]
