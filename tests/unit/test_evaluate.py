"""`evaluate`'s inputs and arithmetic without a model: every bad input named, patient aggregation,
metrics."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mstl.data.labelled import EvaluationInputError, labelled_files
from mstl.evaluation.external import patient_level
from mstl.evaluation.metrics import external_metrics
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
