"""The grid's cells as processes of their own: the command that runs one, what its environment
carries (nesting, tags, run ID file, threads), a failing cell named, and the hashes handed over."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from mstl.data import covid_ct
from mstl.stages import cli, experiment
from mstl.stages.experiment import CellFailed, ExperimentParams, plan, run_cell
from mstl.stages.target import TargetParams, image_sha256s
from mstl.tracking import start_stage_run

# a stand-in for an entry point: what it was given, written where the grid reads it back
ECHO = """
import json, os, pathlib, sys
env = {k: os.environ.get(k) for k in (
    "MSTL_RUN_TAGS", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS", "PYTHONUNBUFFERED")}
pathlib.Path(sys.argv[1]).write_text(json.dumps(env))
pathlib.Path(os.environ["MSTL_RUN_ID_FILE"]).write_text("abc123\\n")
print("cell progress")
"""


def test_every_cell_runs_its_entry_point_with_every_parameter_it_was_planned_with(tmp_path):
    (tmp_path / "iq-oth-nccd" / "Normal cases").mkdir(parents=True)
    p = ExperimentParams(data_root=str(tmp_path), seeds="0,1", split="official,patient").resolved()
    cells = plan(p, "hash", str(tmp_path / "sha256.csv"))
    assert {c.stage for c in cells} == {"prepare_transition", "soft_labels", "transition", "target"}
    for cell in cells:
        params, _ = cell.make({need: f"run-of-{need}" for need in cell.needs})
        command = experiment.cell_command(cell.stage, params)
        assert command[:3] == [sys.executable, "-m", f"entrypoints.{cell.stage}"]
        assert importlib.util.find_spec(f"entrypoints.{cell.stage}") is not None
        assert cli.parse_params(type(params), command[3:]) == params  # nothing lost on the way
    targets = [c.make({n: "run" for n in c.needs})[0] for c in cells if c.stage == "target"]
    assert {t.file_hashes for t in targets} == {str(tmp_path / "sha256.csv")}


def test_a_cell_process_gets_the_grid_tags_and_threads_and_hands_back_its_run_id(
    tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("MLFLOW_RUN_ID", "the-grid-run")  # set by `mlflow run` for the grid itself
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///somewhere.db")
    seen = tmp_path / "seen.json"
    tags = {"mlflow.parentRunId": "the-grid-run", "mstl.grid_cell": "target/x"}
    command = [sys.executable, "-c", ECHO, str(seen)]
    assert run_cell("target/x", command, tags, threads=1) == "abc123"
    env = json.loads(seen.read_text())
    assert json.loads(env["MSTL_RUN_TAGS"]) == tags
    assert env["MLFLOW_RUN_ID"] is None  # else the cell would resume the grid's own run
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:///somewhere.db"
    assert (env["TF_NUM_INTRAOP_THREADS"], env["TF_NUM_INTEROP_THREADS"]) == ("1", "1")
    assert env["PYTHONUNBUFFERED"] == "1"
    assert "cell progress" in capfd.readouterr().out  # the cell's output streams through
    run_cell("target/x", command, tags, threads=0)
    assert json.loads(seen.read_text())["TF_NUM_INTRAOP_THREADS"] is None


def test_a_failed_cell_is_named_and_the_next_cell_runs_in_a_clean_process(tmp_path):
    crash = [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(CellFailed, match=r"grid cell transition/a failed \(exit code 3\)"):
        run_cell("transition/a", crash, {})
    killed = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    with pytest.raises(CellFailed, match=r"grid cell target/b failed \(killed by SIGKILL\)"):
        run_cell("target/b", killed, {})
    silent = [sys.executable, "-c", "pass"]
    with pytest.raises(CellFailed, match=r"target/c failed \(no run ID written\)"):
        run_cell("target/c", silent, {})
    command = [sys.executable, "-c", ECHO, str(tmp_path / "seen.json")]
    assert run_cell("target/d", command, {}) == "abc123"


@dataclasses.dataclass(frozen=True)
class EchoParams:
    value: int = 0
    experiment: str = "cells"


def test_an_entry_point_nests_its_run_under_the_run_named_in_its_environment(
    local_tracking, tmp_path, monkeypatch
):
    with start_stage_run("cells", "grid") as grid:
        grid_id = grid.info.run_id
    tags = {"mlflow.parentRunId": grid_id, "mstl.grid_cell": "target/x"}
    monkeypatch.setenv(cli.RUN_TAGS_ENV, json.dumps(tags))
    monkeypatch.setenv(cli.RUN_ID_FILE_ENV, str(tmp_path / "run_id"))

    def stage(params: EchoParams) -> str:
        with start_stage_run(params.experiment, "cell") as run:
            mlflow.log_param("value", params.value)
            return run.info.run_id

    run_id = cli.run_stage(EchoParams, stage, "echo", ["--value", "7"])
    assert (tmp_path / "run_id").read_text().strip() == run_id
    run = mlflow.MlflowClient(local_tracking).get_run(run_id)
    assert run.data.tags["mlflow.parentRunId"] == grid_id
    assert run.data.tags["mstl.grid_cell"] == "target/x" and run.data.params["value"] == "7"
    monkeypatch.setenv(cli.RUN_TAGS_ENV, "[1]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        cli.tags_from_environment()


def test_the_targets_hashes_come_from_the_grids_csv_or_from_the_files(tmp_path):
    paths = []
    for name, content in (("a.png", b"one"), ("b.png", b"two"), ("c.png", b"three")):
        (tmp_path / name).write_bytes(content)
        paths.append(str(tmp_path / name))
    index = pd.DataFrame({"path": paths[::-1]})
    from_files = image_sha256s(index)
    assert list(from_files) == covid_ct.file_sha256s(paths[::-1])
    csv = tmp_path / "sha256.csv"
    pd.DataFrame({"path": paths, "sha256": covid_ct.file_sha256s(paths)}).to_csv(csv, index=False)
    assert np.array_equal(image_sha256s(index, str(csv)), from_files)  # in the index's order
    pd.DataFrame({"path": paths[:2], "sha256": ["x", "y"]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match="has no hash for 1 image"):
        image_sha256s(index, str(csv))
    with pytest.raises(ValueError, match="file_hashes .* is not a file"):
        TargetParams(file_hashes=str(tmp_path / "none.csv")).validate()


def test_the_grid_hashes_covid_ct_once_into_a_csv_the_targets_read(tmp_path):
    root = tmp_path / "data" / "covid-ct"
    for cls in ("COVID", "NonCOVID"):
        (root / f"CT_{cls}").mkdir(parents=True)
        for i in range(2):
            (root / f"CT_{cls}" / f"{i}.png").write_bytes(f"{cls}{i}".encode())
    data_hash, csv = experiment.hash_covid_ct(str(tmp_path / "data"), tmp_path)
    index = covid_ct.index_images(tmp_path / "data")
    assert data_hash == covid_ct.files_sha256(index["path"])
    assert Path(csv).is_absolute() and list(pd.read_csv(csv).columns) == ["path", "sha256"]
    assert list(image_sha256s(index, csv)) == covid_ct.file_sha256s(index["path"])
