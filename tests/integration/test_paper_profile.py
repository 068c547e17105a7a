"""The paper's grid end to end, as a user types it: `mlflow run . -e experiment -P profile=paper`
with its four backbones x {imagenet, hard, soft} and InceptionV3 soft-label features, on SPIE-AAPM
slices downloaded by `python -m mstl.data.download spie-aapm` (from a fake NBIA server serving real
DICOM re-labelled), then `compare` and `promote`, everything read back from a real `mlflow server`.

At the paper's sizes this is about 1.5 GPU-hours per seed; here every network is randomly
initialised (`weights=none`: their ImageNet weights cannot be downloaded on this machine), at the
smallest image size the four accept (32 px; the soft-label stage reads InceptionV3 features at its
own 224 px), one epoch, two folds, a few dozen slices: what is tested is that every stage of every
backbone runs and nests, not what it learns. Its cost on CI: see docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from mlflow import MlflowClient

from mstl.models import PAPER_BACKBONES
from tests.conftest import DATA_ROOT, REPO, need_shared, run_entry_point
from tests.fake_nbia import FakeNbia, make_series, metadata_rows

pytestmark = pytest.mark.integration

EXPERIMENT = "mstl-paper-profile"
PATIENTS = ["CT-Training-BE001", "CT-Training-BE002", "CT-Training-LC001", "CT-Training-LC002"]
SLICES_PER_SERIES = 10
TRANSITIONS = [(b, s) for b in PAPER_BACKBONES for s in ("hard", "soft")]


@pytest.fixture(scope="module")
def spie_aapm(tmp_path_factory):
    """Four SPIE-AAPM patients (two benign, two malignant) through the real download command."""
    shared = need_shared(DATA_ROOT / "lung-pet-ct-dx")
    templates = sorted(shared.rglob("*.dcm"))[:SLICES_PER_SERIES]
    rows = metadata_rows(
        need_shared(DATA_ROOT / "spie-aapm" / "nbia_download_metadata.csv"), PATIENTS
    )
    series = make_series(rows, templates, SLICES_PER_SERIES)
    data = tmp_path_factory.mktemp("paper") / "data"
    with FakeNbia(series) as fake:
        cmd = [sys.executable, "-m", "mstl.data.download", "spie-aapm", "--dest", str(data),
               "--base-url", fake.base_url, "--patients", ",".join(PATIENTS),
               "--truth", str(DATA_ROOT / "spie-aapm")]  # fmt: skip
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return data / "spie-aapm"


@pytest.fixture(scope="module")
def paper_grid(spie_aapm, mlflow_server, tmp_path_factory):
    """One run of the paper profile's grid, then compare and promote; the tracking server's runs."""
    work = tmp_path_factory.mktemp("paper-grid")
    params = {
        "profile": "paper",
        "weights": "none",
        "image_size": 32,
        "epochs": 1,
        "soft_folds": 2,
        "soft_k_values": "2,4",
        "data_root": DATA_ROOT,
        "transition_dicom_root": spie_aapm,
        "transition_labels_csv": spie_aapm / "labels.csv",
        "export_dir": work / "exports",
        "cache_dir": work / "cache",
    }
    grid = run_entry_point("experiment", params, mlflow_server, EXPERIMENT, timeout=3600)
    assert grid.returncode == 0, grid.stdout[-3000:] + grid.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (grid_run,) = client.search_runs([experiment_id], "tags.stage = 'experiment'")
    compare = run_entry_point(
        "compare",
        {
            "search_experiment": EXPERIMENT,
            "parent_run": grid_run.info.run_id,
            "out_dir": work / "report",
        },
        mlflow_server,
        EXPERIMENT,
    )
    assert compare.returncode == 0, compare.stdout[-3000:] + compare.stderr[-3000:]
    promote = run_entry_point(
        "promote",
        {"search_experiment": EXPERIMENT, "model_name": "mstl-paper-profile"},
        mlflow_server,
        EXPERIMENT,
    )
    assert promote.returncode == 0, promote.stdout[-3000:] + promote.stderr[-3000:]
    runs = client.search_runs([experiment_id], max_results=500)
    return grid_run, runs, work


def by_stage(runs, stage: str) -> list:
    return [r for r in runs if r.data.tags.get("stage") == stage]


def test_eight_transitions_each_backbone_hard_and_soft_under_the_grid(paper_grid):
    grid_run, runs, _ = paper_grid
    transitions = by_stage(runs, "transition")
    found = sorted((r.data.tags["backbone"], r.data.tags["strategy"]) for r in transitions)
    assert found == sorted(TRANSITIONS)
    assert all(r.info.status == "FINISHED" for r in transitions)
    assert {r.data.tags["mlflow.parentRunId"] for r in transitions} == {grid_run.info.run_id}
    (soft_labels,) = by_stage(runs, "soft_labels")
    assert soft_labels.data.params["feature_backbone"] == "inceptionv3"
    for run in transitions:
        if run.data.tags["strategy"] == "soft":
            assert run.data.params["labels"] == soft_labels.info.run_id


def test_twelve_targets_each_nested_under_its_own_transition(paper_grid):
    grid_run, runs, _ = paper_grid
    transition_of = {
        (r.data.tags["backbone"], r.data.tags["strategy"]): r.info.run_id
        for r in by_stage(runs, "transition")
    }
    targets = by_stage(runs, "target")
    assert len(targets) == 12 and all(r.info.status == "FINISHED" for r in targets)
    for run in targets:
        backbone, strategy = run.data.tags["backbone"], run.data.tags["strategy"]
        parent = run.data.tags["mlflow.parentRunId"]
        if strategy == "scratch":  # the baseline cell, randomly initialised: under no Transition
            assert parent == grid_run.info.run_id
            assert run.data.params["weights"] == "none"
        else:
            assert parent == transition_of[(backbone, strategy)], (backbone, strategy)
    cells = sorted((r.data.tags["backbone"], r.data.tags["strategy"]) for r in targets)
    assert cells == sorted((b, s) for b in PAPER_BACKBONES for s in ("scratch", "hard", "soft"))
    assert {r.data.params["image_size"] for r in targets} == {"32"}


def test_compare_writes_table_iii_with_the_four_backbones(paper_grid):
    _, runs, work = paper_grid
    (compare,) = by_stage(runs, "compare")
    assert compare.info.status == "FINISHED"
    table = pd.read_csv(work / "report" / "table_iii.csv")
    assert sorted(table["backbone"].unique()) == sorted(PAPER_BACKBONES)
    assert len(table) == 12  # backbone x strategy, one split


def test_promote_names_a_champion_among_the_grids_targets(paper_grid, mlflow_server):
    _, runs, _ = paper_grid
    client = MlflowClient(mlflow_server)
    champion = client.get_model_version_by_alias("mstl-paper-profile", "champion")
    targets = {r.info.run_id for r in by_stage(runs, "target")}
    assert champion.run_id in targets
