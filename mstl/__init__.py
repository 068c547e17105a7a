"""mstl: Multi-Source Transfer Learning for COVID-19 classification from chest CT.

Stages (one module each): ``mstl.data`` (COVID-CT and image decoding), ``mstl.models``
(backbone registry, heads, freezing), ``mstl.training`` (fitting and the Target stage),
``mstl.evaluation`` (metrics with confidence intervals, plots), ``mstl.tracking`` (MLflow).
"""

import os as _os
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
