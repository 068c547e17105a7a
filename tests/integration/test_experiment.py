"""`-e experiment` on the cpu profile against a real `mlflow server`: the grid's nesting, and a second
run that reuses the finished cells and runs only what is missing (a killed grid picks up)."""

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import run_entry_point

pytestmark = pytest.mark.integration
EXPERIMENT = "mstl-grid"


def test_grid_nests_stages_and_reuses_finished_cells(mlflow_server, data_root, keras_home, tmp_path):
    common = {"profile": "cpu", "data_root": data_root, "epochs": 1, "image_size": 64, "soft_k_values": "2,4",
              "export_dir": tmp_path / "exports", "cache_dir": tmp_path / "cache"}
    first = run_entry_point("experiment", {**common, "strategies": "imagenet"}, mlflow_server, EXPERIMENT)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[1/1] target mobilenet_025 imagenet seed 0: running" in first.stdout
    second = run_entry_point("experiment", common, mlflow_server, EXPERIMENT)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[3/7] target mobilenet_025 imagenet seed 0: reusing finished run" in second.stdout
    assert "[7/7] target mobilenet_025 soft seed 0: running" in second.stdout

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=200)
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags.get("stage"), []).append(run)
    parents = sorted(by_stage["experiment"], key=lambda r: r.info.start_time)
    assert len(parents) == 2 and parents[1].data.metrics["cells_reused"] == 1
    targets = {r.data.tags["strategy"]: r for r in by_stage["target"]}
    assert sorted(targets) == ["hard", "imagenet", "soft"]  # the imagenet cell was not run twice
    transitions = {r.data.tags["strategy"]: r for r in by_stage["transition"]}
    for strategy in ("hard", "soft"):
        assert targets[strategy].data.tags["mlflow.parentRunId"] == transitions[strategy].info.run_id
        assert transitions[strategy].data.tags["mlflow.parentRunId"] == parents[1].info.run_id
    assert targets["imagenet"].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert transitions["soft"].data.params["labels"] == by_stage["soft_labels"][0].info.run_id


def test_compare_can_be_limited_to_one_grid(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(EXPERIMENT)
    grids = sorted(client.search_runs([exp.experiment_id], "tags.stage = 'experiment'"), key=lambda r: r.info.start_time)
    result = run_entry_point("compare", {"search_experiment": EXPERIMENT, "parent_run": grids[1].info.run_id,
                                         "out_dir": tmp_path / "report"}, mlflow_server, EXPERIMENT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compare: 2 Target runs" in result.stdout  # hard and soft; the imagenet run belongs to the first grid
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Bonferroni" in report or "nothing to compare" in report
