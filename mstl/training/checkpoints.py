"""What a fit leaves on its MLflow run besides metrics: the network's shape and its best weights."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np

from mstl.tracking import log_params


def log_model_structure(model) -> None:
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    frozen = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    first_trainable = next(layer.name for layer in model.layers if layer.trainable)
    log_params(
        {
            "trainable_params": trainable,
            "frozen_params": frozen,
            "first_trainable_layer": first_trainable,
        }
    )


def log_checkpoint(model) -> None:
    """The best-validation weights, loadable with ``model.load_weights``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "best.weights.h5"
        model.save_weights(path)
        mlflow.log_artifact(str(path), "checkpoints")
