"""mstl: Multi-Source Transfer Learning for COVID-19 classification from chest CT.

Stages (one module each): ``mstl.data`` (COVID-CT and image decoding), ``mstl.models``
(backbone registry, heads, freezing), ``mstl.training`` (fitting and the Target stage),
``mstl.evaluation`` (metrics with confidence intervals, plots), ``mstl.tracking`` (MLflow).
"""

import os as _os
import shutil as _shutil
import subprocess as _subprocess
from importlib import metadata
from pathlib import Path as _Path

__version__ = "0.1.0"
PACKAGE_DIR = _Path(__file__).resolve().parent  # the package's source (code version, model code)

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) hides the progress lines people need.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Figures are written to files, never shown: no display needed, the same backend everywhere.
_os.environ.setdefault("MPLBACKEND", "Agg")


def tensorflow_build(installed=None) -> str:
    """Which TensorFlow build is installed ("tensorflow" or "tensorflow-cpu"); an error naming the
    fix when there is none, or both (two packages owning one folder break each other)."""

    def present(name: str) -> bool:
        try:
            metadata.distribution(name)
            return True
        except metadata.PackageNotFoundError:
            return False

    found = [name for name in ("tensorflow", "tensorflow-cpu") if (installed or present)(name)]
    if len(found) == 2:
        raise ImportError(
            "both tensorflow and tensorflow-cpu are installed and overwrite each other's files: "
            "keep one (pip uninstall -y tensorflow tensorflow-cpu, then pip install -e '.[cpu]' or "
            "'.[gpu]')"
        )
    if not found:
        raise ImportError(
            "TensorFlow is not installed: pip install -e '.[cpu]' (or '.[gpu]' on a CUDA machine)"
        )
    return found[0]


def nvidia_gpus() -> list[str]:
    """The GPUs ``nvidia-smi -L`` lists; none when it is missing or fails (a CPU-only machine)."""
    if _shutil.which("nvidia-smi") is None:
        return []
    try:
        result = _subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, _subprocess.TimeoutExpired):
        return []
    return [line for line in result.stdout.splitlines() if line.startswith("GPU")]


def unused_gpu_warning(tensorflow_gpus: list) -> str:
    """A warning when ``nvidia-smi`` sees a GPU that TensorFlow does not (the CPU build installed on
    a CUDA machine: the run would take days on the CPU without saying so); empty otherwise."""
    gpus = nvidia_gpus()
    if not gpus or tensorflow_gpus:
        return ""
    return (
        f"WARNING: nvidia-smi sees {len(gpus)} GPU(s) ({gpus[0]}) that TensorFlow does not: this "
        f"run uses the CPU ({tensorflow_build()} is installed). Install the CUDA build: make venv "
        "EXTRAS=gpu,test, or pip install -e '.[gpu]', then mlflow run ... --env-manager local "
        "(README, 'The paper's grid on a GPU')"
    )
