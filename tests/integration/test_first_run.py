"""The README's first run without make: after `make weights` (which seeds Keras's own cache), the
`mlflow run` commands work from the activated venv, offline, with no KERAS_HOME set: Keras finds the
weights where it looks."""

import os
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, SHARED, VENV_BIN, need_shared

pytestmark = pytest.mark.integration


def test_mlflow_run_from_the_activated_venv_finds_the_seeded_keras_cache(
    mlflow_server, data_root, tmp_path
):
    weights = need_shared(SHARED / "weights")
    home = tmp_path / "home"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KERAS_HOME", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")
    }
    env.update(
        HOME=str(home),
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        VIRTUAL_ENV=str(VENV_BIN.parent),
    )
    seeded = subprocess.run(
        [
            "python",
            "-m",
            "mstl.models",
            "prefetch",
            "mobilenet_025",
            "--base-url",
            weights.as_uri(),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert seeded.returncode == 0, seeded.stderr[-2000:]
    assert (
        home / ".keras" / "models" / "mobilenet_2_5_224_tf_no_top.h5"
    ).is_file()  # Keras's default cache

    env["MLFLOW_TRACKING_URI"] = mlflow_server
    run = subprocess.run(
        [
            "mlflow",
            "run",
            ".",
            "-e",
            "target",
            "--env-manager",
            "local",
            "--experiment-name",
            "first-run",
            "-P",
            f"data_root={data_root}",
            "-P",
            "epochs=1",
            "-P",
            "image_size=32",
            "-P",
            "n_bootstrap=20",
            "-P",
            "log_model=false",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    runs = client.search_runs(
        [client.get_experiment_by_name("first-run").experiment_id], "tags.stage = 'target'"
    )
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["weights"] == "imagenet"
