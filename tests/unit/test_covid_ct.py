"""COVID-CT index and the three splits, on the real data in ../shared."""

import shutil

import pandas as pd
import pytest

from mstl.data import covid_ct
from tests.conftest import copy_or_link_tree


def counts(index: pd.DataFrame) -> dict:
    return index.groupby(["class", "split"]).size().to_dict()


def test_index_reads_every_image_with_its_patient(data_root):
    index = covid_ct.index_images(data_root, require_patients=True)
    assert (index["class"] == "COVID").sum() == 349
    assert (index["class"] == "NonCOVID").sum() == 397
    assert index["patient_id"].ne("").all()
    assert index.loc[index["class"] == "COVID", "patient_id"].nunique() == 213
    assert index.loc[index["class"] == "NonCOVID", "patient_id"].nunique() == 171


def test_patient_ids_agree_with_the_derived_table(data_root):
    """Our reading of the original xlsx/csv equals the dataset's derived image_patient_split.csv."""
    derived = pd.read_csv(data_root / "covid-ct" / "meta" / "image_patient_split.csv", dtype=str)
    derived_map = {
        (c, i): p.strip()
        for c, i, p in zip(derived["class"], derived["image"], derived["patient_id"], strict=False)
    }
    index = covid_ct.index_images(data_root, require_patients=True)
    ours = {
        (c, f.split("/", 1)[1]): p
        for c, f, p in zip(index["class"], index["file"], index["patient_id"], strict=False)
    }
    assert ours == derived_map


def test_official_split_counts(data_root):
    index = covid_ct.load_split(data_root, "official")
    assert counts(index) == {
        ("COVID", "train"): 191,
        ("COVID", "val"): 60,
        ("COVID", "test"): 98,
        ("NonCOVID", "train"): 234,
        ("NonCOVID", "val"): 58,
        ("NonCOVID", "test"): 105,
    }


def test_paper_split_has_table_ii_counts_and_depends_on_the_seed(data_root):
    a = covid_ct.load_split(data_root, "paper", seed=0)
    assert counts(a) == {
        ("COVID", "train"): 196,
        ("COVID", "val"): 56,
        ("COVID", "test"): 97,
        ("NonCOVID", "train"): 251,
        ("NonCOVID", "val"): 56,
        ("NonCOVID", "test"): 90,
    }
    assert covid_ct.split_sha256(a) == covid_ct.split_sha256(
        covid_ct.load_split(data_root, "paper", seed=0)
    )
    assert covid_ct.split_sha256(a) != covid_ct.split_sha256(
        covid_ct.load_split(data_root, "paper", seed=1)
    )


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_patient_split_keeps_patients_on_one_side_at_60_15_25(data_root, seed):
    index = covid_ct.load_split(data_root, "patient", seed=seed)
    sides = index.groupby("patient_id")["split"].nunique()
    assert (sides == 1).all(), sides[sides > 1]
    for cls in covid_ct.CLASSES:
        sub = index[index["class"] == cls]
        share = sub["split"].value_counts(normalize=True)
        for part, fraction in covid_ct.PATIENT_FRACTIONS.items():
            assert abs(share[part] - fraction) < 0.05, (cls, part, share[part])


def test_unknown_split_is_named(data_root):
    with pytest.raises(ValueError, match="'random'"):
        covid_ct.load_split(data_root, "random")


def test_missing_split_file_is_named(data_root, tmp_path):
    copy_or_link_tree(data_root / "covid-ct", tmp_path / "covid-ct")
    (tmp_path / "covid-ct" / "splits" / "COVID" / "valCT_COVID.txt").unlink()
    with pytest.raises(FileNotFoundError, match="valCT_COVID.txt"):
        covid_ct.load_split(tmp_path, "official")


def test_missing_dataset_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="covid-ct"):
        covid_ct.load_split(tmp_path, "official")


def test_split_hash_changes_when_one_image_moves(data_root):
    index = covid_ct.load_split(data_root, "official")
    moved = index.copy()
    moved.loc[moved.index[0], "split"] = (
        "val" if moved.loc[moved.index[0], "split"] != "val" else "test"
    )
    assert covid_ct.split_sha256(index) != covid_ct.split_sha256(moved)
    assert len(covid_ct.split_sha256(index)) == 64


def test_unlisted_image_is_reported(data_root, tmp_path):
    copy_or_link_tree(data_root / "covid-ct", tmp_path / "covid-ct")
    some = next((tmp_path / "covid-ct" / "CT_COVID").iterdir())
    shutil.copy(some, some.with_name("extra-image.png"))
    with pytest.raises(ValueError, match="no official split file"):
        covid_ct.load_split(tmp_path, "official")
