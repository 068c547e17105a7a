"""`-e experiment` on the cpu profile against a real `mlflow server`: the grid's nesting, finished
cells reused, two workers sharing one grid, and a grid killed with SIGKILL that resumes on rerun."""

import os
import signal
import subprocess
import time

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, VENV_BIN, run_entry_point

pytestmark = pytest.mark.integration
EXPERIMENT = "mstl-grid"
TINY = {"profile": "cpu", "epochs": 1, "image_size": 64, "soft_k_values": "2,4"}


def grid_cells(client, run_id, tmp_path) -> pd.DataFrame:
    return pd.read_csv(client.download_artifacts(run_id, "grid/cells.csv", str(tmp_path)))


def test_grid_nests_stages_and_reuses_finished_cells(
    mlflow_server, data_root, keras_home, tmp_path
):
    common = {
        **TINY,
        "data_root": data_root,
        "export_dir": tmp_path / "exports",
        "cache_dir": tmp_path / "cache",
    }
    first = run_entry_point(
        "experiment", {**common, "strategies": "imagenet"}, mlflow_server, EXPERIMENT
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[1/1] target/official/mobilenet_025/imagenet/s0: running" in first.stdout
    second = run_entry_point("experiment", common, mlflow_server, EXPERIMENT)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "target/official/mobilenet_025/imagenet/s0: reusing finished run" in second.stdout
    assert (
        "[7/7] target/official/mobilenet_025/soft/s0: running" in second.stdout
    )  # the last cell waits for its Transition

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=200)
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("stage"), []).append(run)
    parents = sorted(by_stage["experiment"], key=lambda r: r.info.start_time)
    assert len(parents) == 2 and parents[1].data.metrics["cells_reused"] == 1
    assert parents[1].data.metrics["cells_run"] == 6
    targets = {r.data.tags["strategy"]: r for r in by_stage["target"]}
    assert sorted(targets) == ["hard", "imagenet", "soft"]  # the imagenet cell was not run twice
    transitions = {r.data.tags["strategy"]: r for r in by_stage["transition"]}
    for strategy in ("hard", "soft"):
        assert (
            targets[strategy].data.tags["mlflow.parentRunId"] == transitions[strategy].info.run_id
        )
        assert transitions[strategy].data.tags["mlflow.parentRunId"] == parents[1].info.run_id
        assert transitions[strategy].data.tags["mstl.grid"] == parents[1].data.tags["mstl.grid"]
    assert targets["imagenet"].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert transitions["soft"].data.params["labels"] == by_stage["soft_labels"][0].info.run_id
    cells = grid_cells(client, parents[1].info.run_id, tmp_path)
    assert (
        len(cells) == 7
        and cells.set_index("cell").loc["target/official/mobilenet_025/imagenet/s0", "reused"]
    )
    assert set(cells.loc[cells["stage"] == "target", "run_id"]) == {
        r.info.run_id for r in targets.values()
    }
    assert (cells["seconds"] >= 0).all() and parents[1].data.metrics["seconds_transition"] > 0
    # the cpu profile's Transition source: IQ-OTH/NCCD, nodule against normal, grouped by near-
    # duplicates
    prepare = by_stage["prepare_transition"][0].data
    assert prepare.params["slices_root"].endswith("iq-oth-nccd")
    assert (
        prepare.metrics["n_kept"],
        prepare.metrics["n_duplicates"],
        prepare.metrics["n_classes"],
    ) == (1055, 42, 2)
    assert prepare.metrics["n_groups"] < 1055
    assert all(t.data.params["group_by"] == "patient" for t in transitions.values())
    # the ImageNet cell decoded COVID-CT and computed its frozen features; the MSTL cells reused
    # both, since a Transition leaves the frozen lower half at its ImageNet weights
    assert (
        targets["imagenet"].data.params["decoded_cache"],
        targets["imagenet"].data.params["frozen_cache"],
    ) == ("miss", "miss")
    for strategy in ("hard", "soft"):
        assert (
            targets[strategy].data.params["decoded_cache"],
            targets[strategy].data.params["frozen_cache"],
        ) == ("hit", "hit")


def test_compare_can_be_limited_to_one_grid(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(EXPERIMENT)
    grids = sorted(
        client.search_runs([exp.experiment_id], "tags.stage = 'experiment'"),
        key=lambda r: r.info.start_time,
    )
    grid = grids[1].info.run_id
    reports = (
        EXPERIMENT + "-reports"
    )  # the compare run is logged apart from the experiment it searches
    result = run_entry_point(
        "compare",
        {"search_experiment": EXPERIMENT, "parent_run": grid, "out_dir": tmp_path / "report"},
        mlflow_server,
        reports,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the grid's cells, the reused imagenet run included; both experiments named, each as what it is
    assert (
        f"compare: 3 Target runs of experiment '{EXPERIMENT}', grid run {grid}; report in"
        in result.stdout
    )
    assert f"this compare run is in experiment '{reports}'" in result.stdout
    logged = client.search_runs(
        [client.get_experiment_by_name(reports).experiment_id], "tags.stage = 'compare'"
    )
    assert len(logged) == 1 and logged[0].data.params["search_experiment"] == EXPERIMENT
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Bonferroni" in report or "Holm" in report


def start_experiment(params: dict, tracking_uri: str, experiment: str) -> subprocess.Popen:
    cmd = [
        str(VENV_BIN / "mlflow"),
        "run",
        str(REPO),
        "-e",
        "experiment",
        "--env-manager",
        "local",
        "--experiment-name",
        experiment,
    ]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=tracking_uri,
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    )
    for leaked in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(leaked, None)
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_two_workers_share_a_grid_and_run_each_cell_once(
    mlflow_server, data_root, keras_home, tmp_path
):
    params = {
        **TINY,
        "strategies": "imagenet",
        "seeds": "0,1",
        "data_root": data_root,
        "cache_dir": tmp_path / "cache",
        "heartbeat_seconds": 10,  # grace 20 s: a worker busy beside another never looks dead
    }
    workers = [start_experiment(params, mlflow_server, "mstl-two-workers") for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (_, err) in zip(workers, outputs, strict=False):
        assert w.returncode == 0, err[-3000:]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("mstl-two-workers")
    targets = client.search_runs([exp.experiment_id], "tags.stage = 'target'")
    assert sorted(r.data.params["seed"] for r in targets) == [
        "0",
        "1",
    ]  # each cell once, no duplicate
    assert all(r.info.status == "FINISHED" for r in targets)
    workers_runs = client.search_runs([exp.experiment_id], "tags.stage = 'experiment'")
    assert len(workers_runs) == 2 and len({r.data.tags["mstl.grid"] for r in workers_runs}) == 1
    assert sum(r.data.metrics["cells_run"] for r in workers_runs) == 2
    for run in workers_runs:  # both workers end knowing every cell's run
        assert set(grid_cells(client, run.info.run_id, tmp_path / run.info.run_id)["run_id"]) == {
            r.info.run_id for r in targets
        }
    print("cells run per worker:", [r.data.metrics["cells_run"] for r in workers_runs])


def test_a_grid_killed_mid_cell_resumes_and_never_reuses_the_orphan(
    mlflow_server, data_root, keras_home, tmp_path
):
    params = {
        **TINY,
        "epochs": 30,
        "strategies": "imagenet",
        "data_root": data_root,
        "cache_dir": tmp_path / "cache",
        "heartbeat_seconds": 2,
    }
    client = MlflowClient(mlflow_server)
    victim = start_experiment(params, mlflow_server, "mstl-killed")
    deadline, orphan = time.time() + 300, None
    while time.time() < deadline and orphan is None:
        exp = client.get_experiment_by_name("mstl-killed")
        found = client.search_runs([exp.experiment_id], "tags.stage = 'target'") if exp else []
        running = [
            r
            for r in found
            if r.info.status == "RUNNING"
            and client.get_metric_history(r.info.run_id, "epoch_train_loss")
        ]
        orphan = running[0] if running else None
        time.sleep(0.5)
    assert orphan is not None, "the Target cell never started training"
    os.killpg(victim.pid, signal.SIGKILL)  # the whole `mlflow run` process group, mid-cell
    victim.communicate(timeout=60)
    assert client.get_run(orphan.info.run_id).info.status == "RUNNING"

    rerun = run_entry_point("experiment", {**params, "epochs": 30}, mlflow_server, "mstl-killed")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"KILLED: {orphan.info.run_id}" in rerun.stdout
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    dead_parent = orphan.data.tags["mlflow.parentRunId"]
    assert (
        client.get_run(dead_parent).info.status == "KILLED"
    )  # the dead worker's experiment run too
    exp = client.get_experiment_by_name("mstl-killed")
    targets = client.search_runs([exp.experiment_id], "tags.stage = 'target'")
    finished = [r for r in targets if r.info.status == "FINISHED"]
    assert (
        len(finished) == 1 and finished[0].info.run_id != orphan.info.run_id
    )  # run again, orphan not reused
    assert "reusing" not in rerun.stdout
