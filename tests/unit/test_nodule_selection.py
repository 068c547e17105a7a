"""prepare_transition's nodule selection on synthetic series: slices within nodule_mm of a nodule's
centre slice, measured along the slice normal, labelled by that nodule; how the centre counts."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mstl.stages.prepare import PrepareParams, build_export
from tests.dicom_factory import write_series


@pytest.fixture
def two_scans(tmp_path):
    """Two series of 12 slices 5 mm apart (InstanceNumber k + 1 at z = 5k): a malignant nodule
    centred on instance 6 (z = 25 mm) and a benign one on instance 3 (z = 10 mm)."""
    malignant, _ = write_series(tmp_path / "in" / "a", n=12, patient_id="LUNGX-CT001")
    benign, _ = write_series(tmp_path / "in" / "b", n=12, patient_id="LUNGX-CT002")
    nodules = pd.DataFrame(
        [
            (malignant, 1, 32, 20, 6, 1, "Primary lung cancer"),
            (benign, 1, 30, 30, 3, 0, "Benign nodule"),
        ],
        columns=["series_instance_uid", "nodule", "x", "y", "slice", "label", "diagnosis"],
    )
    nodules.to_csv(tmp_path / "nodules.csv", index=False)
    scans = pd.DataFrame({"series_instance_uid": [malignant, benign], "label": ["1", "0"]})
    scans.to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path, malignant, benign


def export(folder, **kw):
    params = PrepareParams(
        dicom_root=str(folder / "in"),
        nodules_csv=str(folder / "nodules.csv"),
        export_dir=str(folder / "exports"),
        **kw,
    )
    params.validate()
    return build_export(params)


def test_nodule_slices_are_those_within_reach_in_mm_labelled_by_their_nodule(two_scans):
    folder, malignant, benign = two_scans
    m = export(folder, selection="nodule").manifest
    assert set(m["selection"]) == {"nodule"}
    by_series = m.groupby("series_instance_uid")
    # z in [15, 35] mm around 25 mm, and [0, 20] mm around 10 mm: five slices each
    assert sorted(by_series.get_group(malignant)["slice_position"]) == [15, 20, 25, 30, 35]
    assert sorted(by_series.get_group(benign)["slice_position"]) == [0, 5, 10, 15, 20]
    assert set(by_series.get_group(malignant)["label"]) == {1}
    assert set(by_series.get_group(benign)["label_name"]) == {"Benign nodule"}
    narrow = export(folder, selection="nodule", nodule_mm=0.0).manifest
    assert sorted(narrow["slice_position"]) == [10, 25]  # the centre slices alone


def test_beside_the_lung_selection_each_slice_says_which_selection_kept_it(two_scans):
    folder, malignant, _ = two_scans
    m = export(folder, selection="lung+nodule", labels_csv=str(folder / "labels.csv")).manifest
    lung = m[m["selection"] == "lung"]
    assert len(lung) > 0 and set(m["selection"]) == {"lung", "nodule"}
    assert not m.duplicated(["series_instance_uid", "slice_position"]).any()  # kept once
    near = m[(m["series_instance_uid"] == malignant) & m["slice_position"].between(15, 35)]
    assert set(near["selection"]) == {"nodule"} and len(near) == 5
    assert set(lung["label_name"]) <= {"0", "1"}  # the scan's label from labels_csv


def test_the_montage_shows_the_nodule_slices_framed_blue(two_scans):
    folder, *_ = two_scans
    sheet = np.asarray(Image.open(export(folder, selection="nodule").folder / "montages/s000.png"))
    assert ((sheet[..., 0] == 0) & (sheet[..., 1] == 0) & (sheet[..., 2] == 255)).sum() > 100


def test_how_the_centre_slice_counts_and_bad_nodules_are_named(two_scans):
    folder, malignant, _ = two_scans
    by_position = export(folder, selection="nodule", nodule_counting="position").manifest
    assert len(by_position) == 10  # instance k + 1 is the (k + 1)-th slice here: the same slices
    table = pd.read_csv(folder / "nodules.csv")
    table.loc[0, "slice"] = 40
    table.to_csv(folder / "nodules.csv", index=False)
    with pytest.raises(ValueError, match=f"series {malignant}: no slice has InstanceNumber 40"):
        export(folder, selection="nodule")
    with pytest.raises(ValueError, match="centre slice 40 is outside the series' 1..12"):
        export(folder, selection="nodule", nodule_counting="position")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"selection": "nodules"}, "selection must be one of"),
        ({"selection": "nodule", "nodules_csv": ""}, "needs dicom_root and nodules_csv"),
        ({"selection": "nodule", "nodule_counting": "z"}, "nodule_counting must be one of"),
        ({"selection": "nodule", "nodule_mm": -1.0}, "nodule_mm must be 0 or more"),
    ],
)
def test_impossible_nodule_parameters_are_named(two_scans, kw, match):
    folder, *_ = two_scans
    params = {"nodules_csv": str(folder / "nodules.csv"), **kw}
    with pytest.raises(ValueError, match=match):
        PrepareParams(dicom_root=str(folder / "in"), **params).validate()
