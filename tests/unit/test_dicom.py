"""DICOM reading, ordering, HU, windowing and lung-slice selection: real TCIA data and synthetic
edge cases."""

import numpy as np
import pydicom
import pytest

from mstl.dicom import lung_area, read_hu, scan, select_slices, window
from mstl.dicom.selection import otsu_threshold
from mstl.dicom.series import dataset_hu
from tests.conftest import DATA_ROOT, need_shared
from tests.dicom_factory import JPEG_LS, phantom, write_series, write_slice

LUNG = DATA_ROOT / "lung-pet-ct-dx"


@pytest.fixture(scope="module")
def real():
    return scan(need_shared(LUNG))


@pytest.mark.integration  # the real ../shared data
def test_real_series_are_grouped_and_ordered_along_the_normal(real):
    assert real.files == 85 and real.non_dicom == 25 and real.skipped == []
    assert len(real.series) == 2
    for series in real.series:
        assert series.ordering == "slice_normal"
        assert len(series.slices) == 30
        assert series.positions == [80.0 + 8 * i for i in range(30)]
        # InstanceNumber 1 is the top (z=312) in this study: ordering is by position, not file name
        assert [s.instance_number for s in series.slices] == list(range(30, 0, -1))
    assert {s.uid for s in real.series} == {
        "1.3.6.1.4.1.14519.5.2.1.6655.2359.207154000096236603057216610983",
        "1.3.6.1.4.1.14519.5.2.1.6655.2359.241981550240354690198744362919",
    }


@pytest.mark.integration  # the real ../shared data
def test_hu_is_stored_value_times_slope_plus_intercept(real):
    header = real.series[0].slices[15]
    raw = pydicom.dcmread(header.path).pixel_array
    hu = read_hu(header)
    assert (header.slope, header.intercept) == (1.0, -1024.0)
    for r, c in [(0, 0), (256, 256), (300, 120), (511, 511)]:
        assert hu[r, c] == float(raw[r, c]) - 1024.0
    assert hu[5, 5] < -900  # air around the patient
    assert -100 < np.median(hu[200:312, 200:312]) < 100  # mediastinum: soft tissue near water
    assert np.median(hu[240:272, 100:140]) < -700  # right lung: aerated


def test_lung_window_maps_w1500_l600_to_eight_bits():
    hu = np.array([-1400.0, -1350.0, -600.0, 150.0, 1000.0])
    assert window(hu, 1500, -600).tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError, match="window_width"):
        window(hu, 0, -600)


@pytest.mark.integration  # the real ../shared data
def test_selection_keeps_mid_lung_and_drops_apex_and_abdomen(real):
    for series in real.series:
        areas = np.array([lung_area(read_hu(h)) for h in series.slices])
        keep, relative = select_slices(areas, 0.35)
        z = np.array(series.positions)
        assert (
            not keep[z == 80.0][0] and not keep[z == 312.0][0]
        )  # upper abdomen, neck above the apices
        assert keep[np.argmax(areas)] and keep[(z >= 144) & (z <= 256)].all()
        kept = np.flatnonzero(keep)
        assert (np.diff(kept) == 1).all()  # one contiguous block
        assert relative.max() == 1.0


def test_synthetic_series_is_ordered_and_the_lungless_ends_dropped(tmp_path):
    uid, _ = write_series(tmp_path / "study", n=12)
    result = scan(tmp_path)
    (series,) = result.series
    assert series.uid == uid and series.ordering == "slice_normal"
    assert series.positions == sorted(series.positions)
    areas = np.array([lung_area(read_hu(h)) for h in series.slices])
    keep, _ = select_slices(areas, 0.35)
    assert not keep[0] and not keep[-1] and keep[len(keep) // 2]


def test_oblique_orientation_orders_along_its_normal(tmp_path):
    orientation = (1, 0, 0, 0, 0.8, -0.6)  # tilted gantry
    write_series(tmp_path, n=6, orientation=orientation)
    (series,) = scan(tmp_path).series
    assert [s.instance_number for s in series.slices] == [1, 2, 3, 4, 5, 6]


def test_edge_cases_are_skipped_with_reasons_and_counted(tmp_path):
    uid, _ = write_series(tmp_path / "good", n=6)
    (tmp_path / "notes.txt").write_text("not DICOM")
    (tmp_path / "DICOMDIR-like").write_bytes(b"\x00" * 200)
    write_slice(tmp_path / "mr", "9.9.1", z=0, instance=1, modality="MR")
    write_slice(tmp_path / "nopix", "9.9.2", z=0, instance=1, pixel_data=False)
    write_slice(tmp_path / "jpegls", "9.9.3", z=0, instance=1, transfer_syntax=JPEG_LS)
    write_slice(tmp_path / "noposition", uid, z=None, instance=None)
    write_slice(tmp_path / "noposition2", uid, z=None, instance=7)
    write_slice(tmp_path / "big", uid, z=100.0, instance=8, pixels=phantom(96))
    result = scan(tmp_path)
    assert result.non_dicom == 2
    reasons = {path.split("/")[-1]: reason for path, reason in result.skipped}
    assert reasons["mr"] == "modality MR is not CT"
    assert reasons["nopix"] == "no pixel data"
    assert "JPEG-LS" in reasons["jpegls"] and "pylibjpeg" in reasons["jpegls"]
    assert "missing position tags" in reasons["noposition"]
    assert "missing position tags" in reasons["noposition2"]  # its series has positions
    assert "differs from the series' (64, 64)" in reasons["big"]
    (series,) = result.series
    assert len(series.slices) == 6


def test_series_without_positions_falls_back_to_instance_number(tmp_path):
    for k in (3, 1, 2):
        write_slice(tmp_path / f"f{k}", "7.7.7", z=None, instance=k)
    (series,) = scan(tmp_path).series
    assert series.ordering == "instance_number"
    assert [s.instance_number for s in series.slices] == [1, 2, 3]


def test_missing_root_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan(tmp_path / "nowhere")


# HU through pydicom's Modality LUT stage (pydicom.pixels.apply_modality_lut), against the formula
# the project used before: float32(stored) * float32(slope) + float32(intercept).


def hand_hu(ds) -> np.ndarray:
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return ds.pixel_array.astype(np.float32) * np.float32(slope) + np.float32(intercept)


@pytest.mark.integration  # the real ../shared data
def test_pydicom_modality_lut_gives_the_same_hu_on_every_real_slice(real):
    """Slope 1, intercept -1024 on all 60 slices: exactly the same HU (tolerance 0)."""
    for series in real.series:
        for header in series.slices:
            ds = pydicom.dcmread(header.path)
            np.testing.assert_array_equal(dataset_hu(ds), hand_hu(ds))
            assert dataset_hu(ds).dtype == np.float32


@pytest.mark.parametrize(
    "slope, intercept", [(1, -1024), (0.5, -1024), (1.5, -1000.25), (2.3, -1024), (0.0007, -3.1)]
)
def test_pydicom_modality_lut_agrees_to_float32_rounding_for_any_rescale(
    tmp_path, slope, intercept
):
    """pydicom rescales in float64 and we round once to float32; the float32 formula rounds twice.
    They differ by at most 1e-3 HU (slope 2.3 near 9,000 HU), and the lung window never moves."""
    raw = np.random.default_rng(0).integers(0, 4096, (64, 64)).astype(np.uint16)
    path = write_slice(tmp_path / "s", "1.2.3", z=0.0, instance=1, pixels=raw)
    ds = pydicom.dcmread(path)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ours = dataset_hu(ds)
    np.testing.assert_allclose(ours, hand_hu(ds), rtol=0, atol=1e-3)
    np.testing.assert_array_equal(window(ours, 1500, -600), window(hand_hu(ds), 1500, -600))
    exact = raw.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(ours, exact.astype(np.float32))  # the float64 value, rounded


@pytest.mark.parametrize(
    "tags, expected",
    [({}, (1, 0)), ({"RescaleSlope": 2}, (2, 0)), ({"RescaleIntercept": -1024}, (1, -1024))],
)
def test_a_missing_or_empty_rescale_tag_counts_as_slope_1_intercept_0(tmp_path, tags, expected):
    raw = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096
    ds = pydicom.dcmread(write_slice(tmp_path / "s", "1.2.3", z=0.0, instance=1, pixels=raw))
    del ds.RescaleSlope, ds.RescaleIntercept
    for name, value in tags.items():
        setattr(ds, name, value)
    if "RescaleSlope" not in tags:
        ds.RescaleSlope = None  # present but empty
    np.testing.assert_array_equal(dataset_hu(ds), raw.astype(float) * expected[0] + expected[1])


def test_a_modality_lut_sequence_is_applied_as_dicom_says(tmp_path):
    raw = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    ds = pydicom.dcmread(write_slice(tmp_path / "s", "1.2.3", z=0.0, instance=1, pixels=raw))
    del ds.RescaleSlope, ds.RescaleIntercept
    item = pydicom.Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.LUTData = [10, 20, 30, 40]
    ds.ModalityLUTSequence = pydicom.Sequence([item])
    assert dataset_hu(ds).tolist() == [[10, 20], [30, 40]]


def brute_force_otsu(grey: np.ndarray) -> float:
    """Otsu's criterion by hand: the threshold t (between levels) minimising the pixel-weighted
    within-class variance of {grey < t} and {grey >= t}, tried at every level."""
    values = grey.ravel().astype(float)
    best, best_t = np.inf, 0.5
    for t in np.arange(256) + 0.5:
        low, high = values[values < t], values[values >= t]
        if not len(low) or not len(high):
            continue
        within = len(low) * low.var() + len(high) * high.var()
        if within < best * (1 - 1e-9):  # the first of equal minima, as argmax takes
            best, best_t = within, t
    return best_t


def test_otsu_threshold_is_otsus_criterion():
    """The hand-written Otsu gives the same threshold as the criterion computed by brute force.
    (scikit-image's filters.threshold_otsu gave the same dark masks on 2,092 real slices, but is
    not a dependency: docs/choices.md.)"""
    rng = np.random.default_rng(0)
    for _ in range(20):
        dark = rng.normal(rng.uniform(20, 90), rng.uniform(3, 20), 3000)
        bright = rng.normal(rng.uniform(120, 220), rng.uniform(3, 30), 5000)
        grey = np.clip(np.concatenate([dark, bright]), 0, 255).astype(np.uint8)
        assert otsu_threshold(grey) == brute_force_otsu(grey)
    assert otsu_threshold(np.full((8, 8), 120, np.uint8)) == 0.5  # flat: nothing is dark


def test_otsu_threshold_is_otsus_criterion_on_real_slices(data_root):
    """Every 30th COVID-CT image, reduced as lung_box reduces it: the same threshold."""
    from PIL import Image

    from mstl.data.images import open_grey

    paths = sorted((data_root / "covid-ct").glob("CT_*/*"))[::30]
    for path in paths:
        grey = open_grey(path)
        grey.thumbnail((256, 256), Image.Resampling.BILINEAR)
        pixels = np.asarray(grey)
        assert otsu_threshold(pixels) == brute_force_otsu(pixels), path.name
