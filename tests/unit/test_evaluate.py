"""`evaluate`'s inputs and arithmetic without a model: every bad input named, patient aggregation,
metrics."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mstl.data.labelled import EvaluationInputError, labelled_files
from mstl.evaluation.external import (
    CLUSTER_BOOTSTRAP,
    SLICE_BOOTSTRAP,
    ci_method,
    few_patients_note,
    patient_level,
    patient_table,
    predictions_table,
    set_metrics,
)
from mstl.evaluation.metrics import external_metrics
from mstl.evaluation.plots import patient_strip_figure
from mstl.evaluation.stats import cluster_bootstrap
from mstl.inference.pyfunc import decode_set
from mstl.stages.evaluate import EvaluateParams
from tests.dicom_factory import write_slice

CONFIG = {"image_size": 64, "window_width": 1500.0, "window_level": -600.0}


def image(path, size=(80, 80), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)
    return path


def test_missing_positive_folder_lists_the_folders_found(tmp_path):
    image(tmp_path / "covid" / "a.png")
    image(tmp_path / "normal" / "b.png")
    with pytest.raises(EvaluationInputError, match="'COVID'.*found: covid, normal"):
        labelled_files(images_root=str(tmp_path), positive_class="COVID")


def test_folder_set_labels_by_folder_and_csv_set_resolves_relative_paths(tmp_path):
    image(tmp_path / "set" / "covid" / "a.png")
    image(tmp_path / "set" / "normal" / "b.bmp")
    table = labelled_files(images_root=str(tmp_path / "set"), positive_class="covid")
    assert table.sort_values("path")["label"].tolist() == [1, 0]
    pd.DataFrame(
        {
            "path": ["set/covid/a.png", "set/normal/b.bmp"],
            "label": [1, 0],
            "patient_id": ["p1", "p2"],
        }
    ).to_csv(tmp_path / "labels.csv", index=False)
    table = labelled_files(labels_csv=str(tmp_path / "labels.csv"))
    assert table["path"].tolist() == [
        str(tmp_path / "set/covid/a.png"),
        str(tmp_path / "set/normal/b.bmp"),
    ]
    assert table["patient_id"].tolist() == ["p1", "p2"]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({}, "either images_root"),
        ({"images_root": "x"}, "positive_class"),
        ({"labels_csv": "x.csv", "threshold": 1.0}, "threshold"),
        ({"labels_csv": "x.csv", "n_bootstrap": 0}, "n_bootstrap"),
        ({"labels_csv": "x.csv", "patient_pattern": "ctmd_(P"}, "not a regex"),
        ({"labels_csv": "x.csv", "patient_pattern": "ctmd_(\\w+)_s(\\d+)"}, "has 2 groups"),
    ],
)
def test_impossible_parameters_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        EvaluateParams(**kw).validate()


def test_bad_labels_and_missing_csv_are_named(tmp_path):
    with pytest.raises(EvaluationInputError, match="labels_csv not found"):
        labelled_files(labels_csv=str(tmp_path / "nope.csv"))
    pd.DataFrame({"path": ["a.png"], "label": ["covid"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(EvaluationInputError, match="0 or 1.*covid"):
        labelled_files(labels_csv=str(tmp_path / "bad.csv"))


def test_unreadable_tiny_and_non_ct_files_are_named_or_skipped_and_listed(tmp_path):
    good = image(tmp_path / "good.png")
    tiny = image(tmp_path / "tiny.png", size=(20, 40))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8not a jpeg")
    mr = write_slice(tmp_path / "mr.dcm", "1.2.3", z=0.0, instance=1, modality="MR")
    table = pd.DataFrame(
        {
            "path": [str(good), str(tiny), str(broken), str(mr)],
            "label": [1, 0, 0, 1],
            "patient_id": "",
        }
    )
    for victim, reason in (
        (tiny, "smaller than 32 px"),
        (broken, "cannot read image"),
        (mr, "modality MR is not CT"),
    ):
        one = pd.DataFrame({"path": [str(victim)], "label": [0], "patient_id": ""})
        with pytest.raises(EvaluationInputError, match=f"{victim.name}.*{reason}"):
            decode_set(one, CONFIG, skip_unreadable=False)
    grey, hashes, kept, skipped = decode_set(table, CONFIG, skip_unreadable=True)
    assert grey.shape == (1, 64, 64) and kept == [0] and len(hashes[0]) == 64
    assert [p for p, _ in skipped] == [str(tiny), str(broken), str(mr)]  # nothing dropped silently


def test_patient_level_is_mean_probability_and_any_positive_slice():
    y, p = patient_level([0, 1, 0, 0], [0.2, 0.8, 0.1, 0.3], ["a", "a", "b", "b"])
    assert y.tolist() == [1, 0] and p.tolist() == pytest.approx([0.5, 0.2])


def test_external_metrics_by_hand():
    m = external_metrics([1, 1, 0, 0, 0], [0.9, 0.4, 0.6, 0.2, 0.1], 0.5)
    assert m["sensitivity"] == 0.5 and m["specificity"] == pytest.approx(2 / 3)
    assert m["ppv"] == 0.5 and m["npv"] == pytest.approx(2 / 3) and m["accuracy"] == 0.6
    assert m["roc_auc"] == pytest.approx(5 / 6)
    single = external_metrics(
        [1, 1], [0.9, 0.2], 0.5
    )  # one class: AUC undefined, sensitivity still defined
    assert np.isnan(single["roc_auc"]) and single["sensitivity"] == 0.5


CTMD = (
    "ctmd_[a-z]+_([^_]+)_s"  # covid-ct-md's names: COVID/ctmd_covid_P001_s026_98C14734-ASSH_69.png
)


def ctmd_like(root):
    """Four slices of three patients, named as covid-ct-md names its files."""
    for name in ("ctmd_covid_P001_s026_A_69.png", "ctmd_covid_P001_s027_A_70.png"):
        image(root / "COVID" / name)
    image(root / "non-COVID" / "ctmd_cap_cap001_s004_IM5.png")
    image(root / "non-COVID" / "nested" / "ctmd_normal_normal002_s010_IM11.png")
    return root


def test_patient_pattern_reads_the_patient_from_the_path_relative_to_the_root(tmp_path):
    table = labelled_files(str(ctmd_like(tmp_path)), "COVID", patient_pattern=CTMD)
    assert table["file"].tolist() == [
        "COVID/ctmd_covid_P001_s026_A_69.png",
        "COVID/ctmd_covid_P001_s027_A_70.png",
        "non-COVID/ctmd_cap_cap001_s004_IM5.png",
        "non-COVID/nested/ctmd_normal_normal002_s010_IM11.png",
    ]
    assert table["patient_id"].tolist() == ["P001", "P001", "cap001", "normal002"]
    named = labelled_files(
        str(tmp_path), "COVID", patient_pattern=r"^([^/]+)/(.*/)?ctmd_[a-z]+_(?P<patient>[^_]+)"
    )
    assert named["patient_id"].tolist() == ["P001", "P001", "cap001", "normal002"]
    assert (labelled_files(str(tmp_path), "COVID")["patient_id"] == "").all()


def test_a_file_the_pattern_does_not_match_is_named(tmp_path):
    image(ctmd_like(tmp_path) / "non-COVID" / "scan7.png")
    with pytest.raises(EvaluationInputError, match="does not match the file 'non-COVID/scan7.png'"):
        labelled_files(str(tmp_path), "COVID", patient_pattern=CTMD)
    with pytest.raises(EvaluationInputError, match="empty patient id.*COVID/ctmd_covid_P001"):
        labelled_files(str(tmp_path), "COVID", patient_pattern="ctmd_covid_(x?)")


def test_csv_pattern_applies_to_its_path_entries_and_refuses_a_patient_column(tmp_path):
    ctmd_like(tmp_path / "set")
    rows = {"path": ["set/COVID/ctmd_covid_P001_s026_A_69.png"], "label": [1]}
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    table = labelled_files(labels_csv=str(tmp_path / "a.csv"), patient_pattern=CTMD)
    assert table.loc[0, ["file", "patient_id"]].tolist() == [rows["path"][0], "P001"]
    assert table.loc[0, "path"] == str(tmp_path / rows["path"][0])
    pd.DataFrame(rows | {"patient_id": ["p9"]}).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(EvaluationInputError, match="b.csv has a patient_id column and patient_"):
        labelled_files(labels_csv=str(tmp_path / "b.csv"), patient_pattern=CTMD)


def scored_slices():
    """Eight slices of four patients: a missed COVID patient (p2), a found one (p1), a clean
    negative (n1) and a negative with one confident false positive slice (n2)."""
    table = pd.DataFrame(
        {
            "file": [f"s{i}.png" for i in range(8)],
            "patient_id": ["p1", "p1", "p2", "p2", "n1", "n1", "n2", "n2"],
            "sha256": [f"{i:064x}" for i in range(8)],
            "label": [1, 1, 1, 1, 0, 0, 0, 0],
        }
    )
    return table, np.array([0.9, 0.7, 0.4, 0.1, 0.2, 0.1, 0.95, 0.05])


def test_predictions_name_file_and_patient_and_list_the_misses_first():
    table, prob = scored_slices()
    rows = predictions_table(table, prob, 0.5)
    assert list(rows.columns) == [
        "file",
        "patient_id",
        "sha256",
        "label",
        "probability",
        "predicted",
        "outcome",
    ]
    assert rows["file"].tolist()[:3] == ["s3.png", "s2.png", "s6.png"]  # fn by wrongness, then fp
    assert rows["outcome"].tolist() == ["fn", "fn", "fp", "tp", "tp", "tn", "tn", "tn"]
    assert rows.loc[0, ["patient_id", "label", "predicted"]].tolist() == ["p2", 1, 0]


def test_patient_table_by_hand():
    table, prob = scored_slices()
    rows = patient_table(table, prob, 0.5).set_index("patient_id")
    assert rows.index.tolist() == ["p2", "n2", "p1", "n1"]  # fn, fp, tp, tn
    assert rows.loc["p2"].tolist() == [1, 2, pytest.approx(0.25), 0.0, 0, "fn"]
    assert rows.loc["p1", "mean_probability"] == pytest.approx(0.8)
    assert rows.loc["n2"].tolist() == [0, 2, pytest.approx(0.5), 0.5, 1, "fp"]
    assert rows["n_slices"].sum() == len(table)


def test_slice_intervals_resample_patients_where_patients_are_known():
    table, prob = scored_slices()
    y, patients = table["label"].to_numpy(), table["patient_id"]
    values = set_metrics(y, prob, 0.5, 50, 3, patients)
    by_patient = cluster_bootstrap(
        lambda a, b: external_metrics(a, b, 0.5), y, prob, patients, 50, seed=3
    )
    assert values["sensitivity_ci_low"] == by_patient["sensitivity"].low
    assert values["roc_auc_ci_high"] == by_patient["roc_auc"].high
    assert values["n_patients"] == 4 and values["patient_sensitivity"] == 0.5
    assert ci_method(patients) == CLUSTER_BOOTSTRAP
    assert ci_method(None) == ci_method(["p1", ""] * 4) == SLICE_BOOTSTRAP


def test_few_patients_per_class_are_warned_about():
    y = np.r_[np.ones(20), np.zeros(20)].astype(int)
    few = few_patients_note(np.repeat(["P001", "P002", "n1", "n2"], 10), y)
    assert few.startswith("only 2 positive and 2 negative patient(s)") and "unreliable" in few
    assert few_patients_note(np.arange(40), y) is None  # 20 patients of each class


def test_patient_strip_figure_has_a_strip_per_patient_positives_first():
    table, prob = scored_slices()
    fig = patient_strip_figure(table["patient_id"], table["label"], prob, 0.5)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["p1", "p2", "n1", "n2"]
    assert len(ax.collections) == 4
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(table)
