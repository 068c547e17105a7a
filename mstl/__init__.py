"""mstl: Multi-Source Transfer Learning for COVID-19 classification from chest CT.

Stages (one module each): ``mstl.data`` (COVID-CT and image decoding), ``mstl.models``
(backbone registry, heads, freezing), ``mstl.training`` (fitting and the Target stage),
``mstl.evaluation`` (metrics with confidence intervals, plots), ``mstl.tracking`` (MLflow).
"""

from pathlib import Path as _Path

__version__ = "0.1.0"
PACKAGE_DIR = _Path(__file__).resolve().parent  # the package's source (code version, model code)

import os as _os

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) hides the progress lines people need.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
