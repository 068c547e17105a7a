"""The `ensemble` stage: several Target runs (seeds, or strategies) served as one pyfunc that
averages their served probabilities (each member's own test-time views and temperature).

Members must read their inputs the same way (backbone, preprocessing, ``tta``), since one request is
decoded once. The ensemble's validation and test probabilities are the means of the members' logged
predictions (the same images, matched by file), so nothing is predicted again here; the threshold
is ``threshold`` or chosen on the averaged validation probabilities (``operating_point=youden``).
Grad-CAM and the shortcut probes of `evaluate` read member 0.
"""

from __future__ import annotations

import base64
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import LoggedModelInput

from mstl import defaults
from mstl.evaluation import bootstrap_metrics
from mstl.evaluation.calibration import (
    OPERATING_POINTS,
    expected_calibration_error,
    youden_threshold,
)
from mstl.inference.pyfunc import INPUT_COLUMN, log_serving_model
from mstl.tracking import MODEL_ID_TAG, log_params, log_table, resolve_run, start_stage_run

# what a request's decoding and views depend on: members must agree on all of it
SHARED_CONFIG = (
    "backbone",
    "image_size",
    "lung_crop",
    "intensity",
    "lung_mask",
    "tta",
    "window_width",
    "window_level",
)


@dataclass(frozen=True)
class EnsembleParams:
    """Parameters of `-e ensemble`."""

    run_ids: str = ""  # comma-separated Target run IDs (or runs:/ URIs)
    operating_point: str = "fixed"  # fixed: `threshold`; youden: chosen on averaged validation
    threshold: float = defaults.THRESHOLD
    n_bootstrap: int = defaults.N_BOOTSTRAP
    seed: int = defaults.SEED
    experiment: str = defaults.EXPERIMENT_NAME

    def members(self) -> list[str]:
        return [r.strip() for r in self.run_ids.split(",") if r.strip()]

    def validate(self) -> None:
        if len(self.members()) < 2:
            raise ValueError(f"run_ids must name at least two Target runs, got {self.run_ids!r}")
        if len(set(self.members())) != len(self.members()):
            raise ValueError(f"run_ids names a run twice: {self.run_ids!r}")
        if self.operating_point not in OPERATING_POINTS:
            raise ValueError(
                f"unknown operating_point {self.operating_point!r}; use one of "
                f"{', '.join(OPERATING_POINTS)}"
            )
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


@dataclass(frozen=True)
class Member:
    """One Target run's served model and logged predictions."""

    run_id: str
    model_id: str
    classifier: object  # the CTClassifier
    example: pd.DataFrame
    predictions: dict[str, pd.DataFrame]


def load_member(ref: str) -> Member:
    """A Target run's served model (with its input example) and its val and test predictions."""
    run = resolve_run(ref, stage="target")
    run_id = run.info.run_id
    try:
        loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/classifier")
    except Exception as exc:  # MlflowException, OSError: no served model (log_model=false)
        raise ValueError(f"Target run {run_id} has no served model 'classifier': {exc}") from None
    predictions = {
        part: pd.read_csv(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"predictions/{part}.csv"
            )
        )
        for part in ("val", "test")
    }
    return Member(
        run_id,
        run.data.tags.get(MODEL_ID_TAG, ""),
        loaded.unwrap_python_model(),
        loaded.input_example,
        predictions,
    )


def check_compatible(members: list[Member]) -> None:
    """Members must decode and view a request the same way, and have predicted the same images."""
    first = members[0]
    for m in members:
        for key in SHARED_CONFIG:
            ours, theirs = first.classifier.config.get(key), m.classifier.config.get(key)
            if ours != theirs:
                raise ValueError(
                    f"run {m.run_id} has {key}={theirs!r} but run {first.run_id} has {ours!r}; "
                    "an ensemble's members must share backbone, preprocessing and tta"
                )
        if len(m.classifier.models) != 1:
            raise ValueError(f"run {m.run_id} serves an ensemble; members must be single models")
        for part, frame in m.predictions.items():
            if sorted(frame["file"]) != sorted(first.predictions[part]["file"]):
                raise ValueError(
                    f"run {m.run_id} predicted other {part} images than run {first.run_id}: "
                    "members must share data_root and split"
                )


def mean_predictions(members: list[Member], part: str) -> pd.DataFrame:
    """The members' served probabilities of one split, averaged per file."""
    base = members[0].predictions[part].drop(columns="probability").set_index("file")
    probs = [m.predictions[part].set_index("file")["probability"] for m in members]
    base["probability"] = pd.concat(probs, axis=1).loc[base.index].mean(axis=1)
    return base.reset_index()


def ensemble_config(members: list[Member], threshold: float) -> dict:
    config = {k: v for k, v in members[0].classifier.config.items() if k != "temperature"}
    config["threshold"] = threshold
    config["members"] = [
        {"run_id": m.run_id, "temperature": m.classifier.temperatures[0]} for m in members
    ]
    return config


def log_split(frame: pd.DataFrame, part: str, threshold: float, params, model_id) -> None:
    y, p = frame["label"].to_numpy(), frame["probability"].to_numpy()
    estimates = bootstrap_metrics(
        y, p, threshold, params.n_bootstrap, defaults.CONFIDENCE, params.seed
    )
    values = estimates.flat(f"{part}_") | {f"{part}_ece": expected_calibration_error(y, p)}
    mlflow.log_metrics({k: v for k, v in values.items() if np.isfinite(v)}, model_id=model_id)
    log_table(frame, f"predictions/{part}.csv")


def run_ensemble(params: EnsembleParams) -> str:
    """Log one served pyfunc averaging the members, with its val and test metrics; the run ID."""
    params.validate()
    members = [load_member(ref) for ref in params.members()]
    check_compatible(members)
    val, test = mean_predictions(members, "val"), mean_predictions(members, "test")
    threshold = (
        youden_threshold(val["label"], val["probability"])
        if params.operating_point == "youden"
        else params.threshold
    )
    config = ensemble_config(members, threshold)
    with start_stage_run(params.experiment, f"ensemble-{len(members)}") as run:
        mlflow.set_tags({"stage": "ensemble", "backbone": config["backbone"]})
        log_params(
            {
                "run_ids": ",".join(m.run_id for m in members),
                "n_members": len(members),
                "operating_point": params.operating_point,
                "threshold": params.threshold,
                "n_bootstrap": params.n_bootstrap,
                "seed": params.seed,
            }
        )
        mlflow.log_metric("operating_threshold", threshold)
        for m in members:
            if m.model_id:
                mlflow.log_input(model=LoggedModelInput(m.model_id))
        with tempfile.TemporaryDirectory() as tmp:
            example = Path(tmp) / "example"
            example.write_bytes(base64.b64decode(members[0].example[INPUT_COLUMN].iloc[0]))
            info = log_serving_model([m.classifier.model for m in members], config, example)
        mlflow.set_tag(MODEL_ID_TAG, info.model_id)
        for part, frame in (("val", val), ("test", test)):
            log_split(frame, part, threshold, params, info.model_id)
        return run.info.run_id
