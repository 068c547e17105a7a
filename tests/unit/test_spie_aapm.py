"""LUNGx truth: the real spreadsheets in ../shared (integration-marked), and small ones written
here for what the real ones do not show (a missing column, an unknown diagnosis, x,y forms)."""

from __future__ import annotations

import pandas as pd
import pytest
from openpyxl import Workbook

from mstl.data import spie_aapm
from mstl.data.export import read_labels
from tests.conftest import DATA_ROOT

SPIE = DATA_ROOT / "spie-aapm"
TEST_HEADER = [
    "Scan Number",
    "Nodule Number",
    "Nodule Center x,y Position*",
    "Nodule Center Image",
    "Final Diagnosis",
]
CAL_HEADER = ["Scan Number", "Nodule Center x,y Position*", "Nodule Center Image", "Diagnosis"]
FOOTNOTE = "*specified in pixels, where position (1,1) corresponds to the upper-leftmost pixel"


def write_xlsx(path, header, rows, sheet="Sheet1", empty_first=False):
    book = Workbook()
    ws = book.active
    if empty_first:  # like the calibration file's second, empty sheet, but first
        ws.title = "Empty"
        ws = book.create_sheet(sheet)
    else:
        ws.title = sheet
    for row in [header, *rows]:
        ws.append(list(row))
    book.save(path)
    return path


def real_files():
    from tests.conftest import need_shared

    need_shared(SPIE)
    return (
        SPIE / spie_aapm.TEST_XLSX,
        SPIE / spie_aapm.CALIBRATION_XLSX,
        SPIE / "nbia_download_metadata.csv",
    )


@pytest.mark.integration  # the real ../shared data
def test_real_spreadsheets_give_70_scans_35_malignant():
    test_xlsx, cal_xlsx, series_csv = real_files()
    nodules = spie_aapm.read_nodules(test_xlsx, cal_xlsx)
    assert len(nodules) == 83  # 73 test nodules + 10 calibration, footnotes dropped
    assert nodules.groupby("source").size().to_dict() == {"calibration": 10, "test": 73}
    assert nodules["diagnosis"].value_counts().to_dict() == {
        "Benign nodule": 37,
        "Primary lung cancer": 34,  # 16 written plain, 18 with a trailing space
        "benign": 5,
        "malignant": 5,
        "Suspicious malignant nodule": 2,
    }
    scans = spie_aapm.scan_labels(nodules)
    assert len(scans) == 70 and scans["label"].sum() == 35
    by_source = scans.groupby("source")["label"].agg(["sum", "size"]).to_dict("index")
    assert by_source == {"test": {"sum": 30, "size": 60}, "calibration": {"sum": 5, "size": 10}}
    ct005 = scans.set_index("key").loc["LUNGX-CT005"]
    assert (ct005["label"], ct005["nodules"]) == (1, 2)  # a cancer and a benign nodule
    match = spie_aapm.match_series(scans, series_csv)
    assert match.complete and len(match.table) == 70
    assert match.table["series_instance_uid"].is_unique


@pytest.mark.integration  # the real ../shared data
def test_real_labels_csv_is_what_prepare_reads(tmp_path):
    scans_csv, nodules_csv = spie_aapm.write_labels(*real_files(), tmp_path)
    scans = pd.read_csv(scans_csv, dtype=str)
    assert list(scans.columns) == spie_aapm.SCAN_COLUMNS and len(scans) == 70
    assert scans["label"].value_counts().to_dict() == {"0": 35, "1": 35}
    # ids as the DICOM PatientID spells them, not as the spreadsheets do
    assert {"CT-Training-LC001", "LUNGx-CT001"} <= set(scans["patient_id"])
    key, labels = read_labels(str(scans_csv), "")
    assert key == "series_instance_uid" and len(labels) == 70
    assert sorted(v for v, _ in labels.values()) == [0] * 35 + [1] * 35
    nodules = pd.read_csv(nodules_csv)
    assert len(nodules) == 83 and nodules["series_instance_uid"].notna().all()
    lc001 = nodules[nodules["patient_id"] == "CT-Training-LC001"].iloc[0]
    assert (lc001["scan"], lc001["x"], lc001["y"], lc001["slice"]) == (
        "CT-Training-lc001",
        120,
        325,
        135,
    )
    assert nodules["slice"].between(1, 512).all()


@pytest.mark.integration  # the real ../shared data
def test_nodule_slices_lie_within_each_series(tmp_path):
    """What can be said about 'Nodule Center Image' without the images: every value is a slice
    number within 1..ImageCount of its series."""
    test_xlsx, cal_xlsx, series_csv = real_files()
    _, nodules_csv = spie_aapm.write_labels(test_xlsx, cal_xlsx, series_csv, tmp_path)
    nodules = pd.read_csv(nodules_csv)
    counts = pd.read_csv(series_csv).set_index("Series UID")["Number of Images"]
    ratio = nodules["slice"] / nodules["series_instance_uid"].map(counts)
    assert (nodules["slice"] >= 1).all() and (ratio <= 1).all()


def test_a_missing_column_is_named(tmp_path):
    header = [h for h in TEST_HEADER if h != "Final Diagnosis"]
    path = write_xlsx(tmp_path / "t.xlsx", header, [("LUNGx-CT001", 1, "1, 2", 3)])
    with pytest.raises(spie_aapm.TruthError, match=r"t.xlsx sheet 'Sheet1' row 1.*'Final Diag"):
        spie_aapm.read_truth(path, "test")


def test_an_unknown_diagnosis_is_named_with_its_row(tmp_path):
    rows = [("LUNGx-CT001", 1, "1, 2", 3, "Benign nodule"), ("LUNGx-CT002", 1, "4, 5", 6, "Maybe")]
    path = write_xlsx(tmp_path / "t.xlsx", TEST_HEADER, rows)
    with pytest.raises(spie_aapm.TruthError, match=r"t.xlsx sheet 'Sheet1' row 3.*'Maybe'"):
        spie_aapm.read_truth(path, "test")


@pytest.mark.parametrize(
    "cell, xy",
    [("120, 325", (120, 325)), ("95,328", (95, 328)), ("(7; 512)", (7, 512)), (120325, (120, 325))],
)
def test_both_forms_of_the_xy_cell(tmp_path, cell, xy):
    rows = [(" ct-training-lc001 ", cell, 135.0, "malignant "), (FOOTNOTE, None, None, None)]
    path = write_xlsx(tmp_path / "c.xlsx", CAL_HEADER, rows, sheet="FinalTo", empty_first=True)
    table = spie_aapm.read_truth(path, "calibration")
    assert len(table) == 1  # the footnote row is dropped
    row = table.iloc[0]
    assert (row["scan"], row["x"], row["y"], row["slice"], row["label"], row["nodule"]) == (
        "ct-training-lc001",
        *xy,
        135,
        1,
        1,
    )


@pytest.mark.parametrize(
    "cell, message",
    [
        (120.325, "cannot tell x from y"),
        (325, "cannot tell x from y"),
        ("120 - 325", "is not 'x, y'"),
        ("0, 12", "off a 512-pixel image"),
        (None, "empty"),
    ],
)
def test_an_xy_cell_that_cannot_be_read_is_refused(tmp_path, cell, message):
    path = write_xlsx(tmp_path / "c.xlsx", CAL_HEADER, [("CT-Training-be001", cell, 1, "benign")])
    with pytest.raises(spie_aapm.TruthError, match=rf"c.xlsx sheet 'Sheet1' row 2.*{message}"):
        spie_aapm.read_truth(path, "calibration")


def test_a_bad_slice_and_a_repeated_nodule_are_refused(tmp_path):
    path = write_xlsx(tmp_path / "a.xlsx", TEST_HEADER, [("LUNGx-CT001", 1, "1, 2", "x", "benign")])
    with pytest.raises(spie_aapm.TruthError, match="row 2: Nodule Center Image 'x'"):
        spie_aapm.read_truth(path, "test")
    rows = [("LUNGx-CT001", 1, "1, 2", 3, "benign"), ("lungx-ct001", 1, "3, 4", 5, "benign")]
    path = write_xlsx(tmp_path / "b.xlsx", TEST_HEADER, rows)
    with pytest.raises(spie_aapm.TruthError, match="row 3: nodule 1 repeated"):
        spie_aapm.read_truth(path, "test")


def test_labels_follow_the_series_list_and_unmatched_ids_are_named(tmp_path):
    test_rows = [
        ("LUNGx-CT001", 1, "1, 2", 3, "Benign nodule"),
        ("LUNGx-CT001", 2, "4, 5", 6, "Primary lung cancer "),
        ("LUNGx-CT002", 1, "7, 8", 9, "Benign nodule"),
        (FOOTNOTE, None, None, None, None),
        ("All images are in DICOM format with a matrix size of 512x512 pixels.",),
    ]
    test_xlsx = write_xlsx(tmp_path / "t.xlsx", TEST_HEADER, test_rows)
    cal_xlsx = write_xlsx(
        tmp_path / "c.xlsx", CAL_HEADER, [("CT-Training-lc001", "1, 2", 3, "malignant")]
    )
    series = tmp_path / "series.csv"
    series.write_text(
        "patient_id,series_instance_uid\nLUNGx-CT001,1.1\nCT-Training-LC001,1.2\nLUNGx-CT003,1.3\n"
    )
    unmatched = r"without a series \['LUNGx-CT002'\].*without a scan \['LUNGx-CT003'\]"
    with pytest.raises(spie_aapm.TruthError, match=unmatched):
        spie_aapm.write_labels(test_xlsx, cal_xlsx, series, tmp_path / "out")
    scans_csv, nodules_csv = spie_aapm.write_labels(
        test_xlsx, cal_xlsx, series, tmp_path / "out", strict=False
    )
    scans = pd.read_csv(scans_csv, dtype=str).set_index("patient_id")
    assert scans.loc["LUNGx-CT001", "label"] == "1"  # any malignant nodule
    assert scans.loc["CT-Training-LC001", "series_instance_uid"] == "1.2"
    assert len(scans) == 2 and len(pd.read_csv(nodules_csv)) == 4
