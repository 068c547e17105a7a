"""prepare_transition's export: labels, reuse, interruption, PHI, and 2-D slice folders."""

import pandas as pd
import pytest

from mstl.data import export as library
from mstl.stages.prepare import PrepareParams, build_export
from tests.conftest import DATA_ROOT, need_shared
from tests.dicom_factory import write_series, write_slice

LUNG = DATA_ROOT / "lung-pet-ct-dx"
IQ = DATA_ROOT / "iq-oth-nccd"


def dicom_params(tmp_path, **kw):
    need_shared(LUNG)
    return PrepareParams(dicom_root=str(LUNG), export_dir=str(tmp_path / "exports"), **kw)


@pytest.mark.integration  # the real ../shared data
def test_slice_labels_join_the_selected_slices(tmp_path):
    export = build_export(
        dicom_params(
            tmp_path, labels_csv=str(LUNG / "slice_labels.csv"), label_map="tumour=1,no_tumour=0"
        )
    )
    m = export.manifest
    assert list(m.columns) == library.MANIFEST_COLUMNS
    assert len(m) == 42 and m["series_instance_uid"].nunique() == 2
    # every annotated (tumour) slice lies mid-lung, so all 18 are kept
    assert (m["label"] == 1).sum() == 18 and (m["label"] == 0).sum() == 24
    truth = pd.read_csv(LUNG / "slice_labels.csv").set_index("sop_instance_uid")["label"]
    assert (m["label_name"] == truth.loc[m["sop_instance_uid"]].to_numpy()).all()
    assert (export.folder / m["file"].iloc[0]).is_file()
    series = pd.read_csv(export.folder / "series.csv")
    assert series["n_slices"].tolist() == [30, 30] and series["n_kept"].tolist() == [21, 21]
    assert (export.folder / "montages" / "s000.png").is_file()


@pytest.mark.integration  # the real ../shared data
def test_patient_labels_of_one_class_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="hard task has a single class.*'?1'?.*patient_labels.csv"):
        build_export(dicom_params(tmp_path, labels_csv=str(LUNG / "patient_labels.csv")))


@pytest.mark.integration  # the real ../shared data
def test_label_outside_the_map_is_named(tmp_path):
    with pytest.raises(ValueError, match="'no_tumour'.*not in label_map"):
        build_export(dicom_params(tmp_path, labels_csv=str(LUNG / "slice_labels.csv")))


@pytest.mark.integration  # the real ../shared data
def test_rerun_reuses_the_finished_export(tmp_path):
    params = dicom_params(tmp_path)
    first = build_export(params)
    second = build_export(params)
    assert not first.reused and second.reused and first.folder == second.folder
    changed = build_export(dicom_params(tmp_path, min_lung_fraction=0.5))
    assert changed.folder != first.folder and len(changed.manifest) < len(first.manifest)


@pytest.mark.integration  # the real ../shared data
def test_interrupted_export_leaves_no_manifest(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = library.save_slice

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real_save(*args, **kwargs)

    monkeypatch.setattr(library, "save_slice", flaky)
    params = dicom_params(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        build_export(params)
    assert list((tmp_path / "exports").iterdir()) == []
    monkeypatch.setattr(library, "save_slice", real_save)
    assert not build_export(params).reused


def test_no_patient_name_in_file_names_or_logged_tables(tmp_path):
    write_series(tmp_path / "Doe^Jane" / "chest", n=10)
    write_slice(tmp_path / "Doe^Jane" / "scout", "5.5.5", z=0, instance=1, modality="MR")
    export = build_export(PrepareParams(dicom_root=str(tmp_path), export_dir=str(tmp_path / "out")))
    for path in export.folder.rglob("*"):
        assert "Doe" not in str(path.relative_to(export.folder))
    for logged in ("manifest.csv", "skipped.csv", "series.csv", "summary.json"):
        assert "Doe" not in (export.folder / logged).read_text(), logged
    assert pd.read_csv(export.folder / "skipped.csv")["reason"].tolist() == [
        "modality MR is not CT"
    ]


def test_nothing_usable_is_an_error(tmp_path):
    write_slice(tmp_path / "in" / "a", "1.1", z=0, instance=1, modality="MR")
    (tmp_path / "in" / "b.txt").write_text("x")
    with pytest.raises(ValueError, match="nothing usable.*1 not DICOM.*modality MR"):
        build_export(
            PrepareParams(dicom_root=str(tmp_path / "in"), export_dir=str(tmp_path / "out"))
        )


@pytest.mark.parametrize(
    "kw, match",
    [
        ({}, "exactly one of"),
        ({"dicom_root": "a", "slices_root": "b"}, "exactly one of"),
        ({"dicom_root": "a", "image_format": "tiff"}, "image_format"),
        ({"dicom_root": "a", "min_lung_fraction": 2.0}, "min_lung_fraction"),
        ({"dicom_root": "a", "labels_csv": "/nowhere.csv"}, "nowhere.csv"),
    ],
)
def test_impossible_parameters_are_named(kw, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        PrepareParams(**kw).validate()


@pytest.fixture(scope="module")
def iq_export(tmp_path_factory):
    need_shared(IQ)
    params = PrepareParams(
        slices_root=str(IQ),
        label_map="Malignant cases=1,Bengin cases=0,Normal cases=0",
        export_dir=str(tmp_path_factory.mktemp("iq")),
    )
    return build_export(params)


@pytest.mark.integration  # the real ../shared data
def test_slice_folder_duplicates_are_kept_once_and_reported(iq_export):
    m = iq_export.manifest
    assert len(m) == 1097 - 42
    assert (m["label"] == 1).sum() == 561 - 14 and (m["label"] == 0).sum() == (120 - 17) + (
        416 - 11
    )
    duplicates = pd.read_csv(iq_export.folder / "duplicates.csv")
    assert (
        len(duplicates) == 42
        and (duplicates["kept_sha256"] == duplicates["duplicate_sha256"]).all()
    )
    assert m["source_sha256"].is_unique


@pytest.mark.integration  # the real ../shared data
def test_near_duplicates_are_grouped_into_pseudo_patients_within_a_class(iq_export):
    m = iq_export.manifest
    groups = m.groupby("patient_id")
    assert 100 < len(groups) < len(m)
    assert groups.size().max() > 5
    mixed = (groups["label"].nunique() > 1).sum()
    assert mixed <= 3  # near-duplicates almost never cross classes


@pytest.mark.integration  # the real ../shared data
def test_label_map_can_drop_a_class_or_keep_three(tmp_path):
    need_shared(IQ)
    dropped = build_export(
        PrepareParams(
            slices_root=str(IQ),
            label_map="Malignant cases=1,Bengin cases=0,Normal cases=drop",
            export_dir=str(tmp_path),
        )
    )
    assert len(dropped.manifest) == (561 - 14) + (120 - 17)
    three = build_export(PrepareParams(slices_root=str(IQ), export_dir=str(tmp_path)))
    assert sorted(three.manifest["label_name"].unique()) == [
        "Bengin cases",
        "Malignant cases",
        "Normal cases",
    ]
    assert sorted(three.manifest["label"].unique()) == [0, 1, 2]


def test_without_grouping_a_warning_says_so(tmp_path):
    folder = tmp_path / "slices"
    import numpy as np
    from PIL import Image

    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((16, 16), 40 * i + (cls == "b") * 100, np.uint8)).save(
                folder / cls / f"{i}.png"
            )
    (folder / "a" / "broken.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="no patient IDs"):
        export = build_export(
            PrepareParams(
                slices_root=str(folder), group_near_duplicates=False, export_dir=str(tmp_path / "o")
            )
        )
    assert export.manifest["patient_id"].is_unique
    skipped = pd.read_csv(export.folder / "skipped.csv")
    assert len(skipped) == 1 and "empty" in skipped["reason"][0]
