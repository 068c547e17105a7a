"""`mstl doctor` names what a profile lacks and exits non-zero for it; warnings do not fail it."""

import os
import subprocess
import sys

import pytest

from mstl import nvidia_gpus, unused_gpu_warning
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


FAKE_SMI = '#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-0000)"\n'


def fake_nvidia_smi(folder):
    """An ``nvidia-smi`` that lists one GPU: this machine has none, so a CUDA machine's answer is
    played by a script (what it prints is nvidia-smi -L's format)."""
    smi = folder / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    return folder


def test_an_unused_gpu_is_named_and_a_cpu_machine_hears_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi: a CPU-only machine
    assert nvidia_gpus() == [] and unused_gpu_warning([]) == ""
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path)}:/usr/bin:/bin")
    warning = unused_gpu_warning([])
    assert "1 GPU(s) (GPU 0: NVIDIA H200" in warning and "EXTRAS=gpu,test" in warning
    assert unused_gpu_warning(["/physical_device:GPU:0"]) == ""  # TensorFlow sees it: all well


@pytest.mark.integration
def test_every_entry_point_warns_of_a_gpu_tensorflow_does_not_see(tmp_path):
    """Said before the stage starts (here one that then fails on its parameters)."""
    fake_nvidia_smi(tmp_path)
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "entrypoints.compare", "--target_recall", "5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0 and "that TensorFlow does not" in done.stderr


def test_make_installs_the_cuda_build_only_where_nvidia_smi_lists_a_gpu(tmp_path):
    def install_line(path: str) -> str:
        dry = subprocess.run(
            ["make", "-n", "venv", f"VENV={tmp_path / 'venv'}"],
            cwd=REPO, env={"PATH": path, "HOME": str(tmp_path)}, capture_output=True, text=True,
        )  # fmt: skip
        return next(line for line in dry.stdout.splitlines() if "pip install -q -e" in line)

    assert ".[cpu,test]" in install_line("/usr/bin:/bin")
    assert ".[gpu,test]" in install_line(f"{fake_nvidia_smi(tmp_path)}:/usr/bin:/bin")
