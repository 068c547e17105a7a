"""`mstl doctor` names what a profile lacks and exits non-zero for it; warnings do not fail it."""

import subprocess
import sys

import pytest

from mstl.stages.doctor import DoctorParams, examine, run_doctor
from tests.conftest import REPO


def test_missing_data_and_a_silent_tracking_server_are_named_and_fail(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    found = examine(DoctorParams(profile="cpu", data_root=str(tmp_path)))
    reasons = "\n".join(found.missing)
    assert "http://127.0.0.1:9 does not answer" in reasons
    assert "COVID-CT not found" in reasons and str(tmp_path / "covid-ct") in reasons
    assert str(tmp_path / "iq-oth-nccd") in reasons
    assert run_doctor(DoctorParams(profile="cpu", data_root=str(tmp_path))) == 1
    out = capsys.readouterr().out
    assert "not ready: 3 thing(s) missing" in out and out.count("missing: ") == 3


def test_a_ready_machine_prints_its_facts_and_the_paper_profile_warns_without_a_gpu(
    local_tracking, tmp_path
):
    covid = tmp_path / "covid-ct"
    for folder in ("CT_COVID", "CT_NonCOVID"):
        (covid / folder).mkdir(parents=True)
        (covid / folder / "a.png").write_bytes(b"")  # counted, not decoded
    found = examine(DoctorParams(profile="paper", data_root=str(tmp_path)))
    assert found.missing == []
    text = "\n".join(found.lines)
    for fact in ("python", "tensorflow", "devices", "keras", "tracking", "covid-ct", "memory"):
        assert fact in text
    assert "answers" in text and "2 images" in text
    assert any("without a GPU" in w for w in found.warnings)  # this machine has none


@pytest.mark.integration  # a fresh Python that loads TensorFlow: seconds
def test_the_command_line_rejects_an_unknown_profile():
    result = subprocess.run(
        [sys.executable, "-m", "mstl", "doctor", "--profile", "gpu-cluster"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode != 0 and "unknown profile 'gpu-cluster'" in result.stderr
    usage = subprocess.run([sys.executable, "-m", "mstl"], capture_output=True, text=True, cwd=REPO)
    assert usage.returncode != 0 and "python -m mstl {doctor}" in usage.stderr


@pytest.fixture(autouse=True)
def _no_gpu_here():
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("these expectations are for a machine without a GPU")


def test_the_weight_file_names_are_the_ones_keras_caches():
    """The registry's file names, checked against Keras's own source of each application."""
    import inspect

    import keras

    from mstl.models import BACKBONES

    sources = {
        "resnet50v2": keras.src.applications.resnet,
        "resnet101v2": keras.src.applications.resnet,
        "densenet121": keras.src.applications.densenet,
        "densenet169": keras.src.applications.densenet,
        "inceptionv3": keras.src.applications.inception_v3,
    }
    for name, module in sources.items():
        text = inspect.getsource(module)
        stem = BACKBONES[name].keras_weights_file.split("_weights_")[0]
        assert stem in text and "_weights_tf_dim_ordering_tf_kernels_notop.h5" in text, name
    assert BACKBONES["mobilenet_025"].keras_weights_file == "mobilenet_2_5_224_tf_no_top.h5"
