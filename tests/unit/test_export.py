"""The Transition export as a library (mstl.data.export), apart from the stage that logs it."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from mstl.data.export import ExportSpec, build_export, export_key
from mstl.stages.prepare import PrepareParams
from tests.dicom_factory import write_series


def test_the_stage_parameters_are_the_export_spec_plus_where_and_how_to_log():
    spec = [f.name for f in dataclasses.fields(ExportSpec)]
    stage = [f.name for f in dataclasses.fields(PrepareParams)]
    assert stage == [*spec, "export_dir", "log_slices", "experiment"]


def test_where_and_how_a_run_logs_does_not_change_the_export_key(tmp_path):
    write_series(tmp_path / "in", n=4)
    spec = ExportSpec(dicom_root=str(tmp_path / "in"), min_lung_fraction=0.3)
    params = PrepareParams(
        dicom_root=str(tmp_path / "in"),
        min_lung_fraction=0.3,
        export_dir=str(tmp_path / "elsewhere"),
        log_slices=False,
        experiment="other",
    )
    assert export_key(params) == export_key(spec)
    assert export_key(dataclasses.replace(spec, window_level=-500)) != export_key(spec)


def test_labels_by_patient_label_drop_and_leave_out_slices(tmp_path):
    for patient in ("P1", "P2", "P3", "P4"):
        write_series(tmp_path / "in" / patient, n=8, patient_id=patient)
    labels = tmp_path / "labels.csv"
    pd.DataFrame(
        {"patient_id": ["P1", "P2", "P3"], "label": ["malignant", "benign", "unclear"]}
    ).to_csv(labels, index=False)
    spec = ExportSpec(
        dicom_root=str(tmp_path / "in"), labels_csv=str(labels), label_map="unclear=drop"
    )
    export = build_export(spec, tmp_path / "out")
    m = export.manifest
    assert sorted(m["patient_id"].unique()) == ["P1", "P2", "P4"]  # P3 dropped by label_map
    by_patient = m.groupby("patient_id")["label"].first()
    assert by_patient["P1"] == 1 and by_patient["P2"] == 0 and pd.isna(by_patient["P4"])
    assert export.summary["n_labelled"] == int(m["patient_id"].isin(["P1", "P2"]).sum())
    series = pd.read_csv(export.folder / "series.csv")
    assert len(series) == 4 and (series["n_slices"] == 8).all()
    assert len(list((export.folder / "montages").glob("s*.png"))) == 4
    for row in m.itertuples():
        assert (export.folder / row.file).is_file()


def test_a_failed_write_fails_the_export_and_leaves_nothing(tmp_path, monkeypatch):
    from mstl.data import export as library

    write_series(tmp_path / "in", n=6)

    def full_disk(pixels, path, image_format):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(library, "save_slice", full_disk)
    with pytest.raises(OSError, match="No space left"):
        build_export(ExportSpec(dicom_root=str(tmp_path / "in")), tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_near_duplicate_distances_count_bits_as_the_lookup_table_did():
    """np.bitwise_count replaces a 256-entry popcount table: the same Hamming distances, so the
    same groups (exact)."""
    from mstl.data.slices import group_near_duplicates

    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint16)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (40, 32), dtype=np.uint8)
    flips = rng.integers(0, 256, (40, 32), dtype=np.uint8) & rng.integers(0, 256, (40, 32)) & 0x11
    hashes = np.concatenate([base, base ^ flips.astype(np.uint8)])
    for max_bits in (0, 10, 24, 60):
        distance = table[np.bitwise_xor(hashes[:, None, :], hashes[None, :, :])].sum(axis=2)
        expected = connected_groups(distance <= max_bits)
        assert group_near_duplicates(hashes, max_bits, chunk=7).tolist() == expected


def connected_groups(linked) -> list[int]:
    """Group ids by first appearance, by hand: the reference for group_near_duplicates."""
    n, group = len(linked), [-1] * len(linked)
    count = 0
    for start in range(n):
        if group[start] >= 0:
            continue
        stack, group[start] = [start], count
        while stack:
            i = stack.pop()
            for j in map(int, np.flatnonzero(linked[i])):
                if group[j] < 0:
                    group[j] = count
                    stack.append(j)
        count += 1
    return group
