"""The Transition stage: fine-tune a backbone on lung CT slices from a prepare_transition manifest,
with hard labels (benign/malignant, tumour/no tumour: sigmoid + BCE) or soft labels (KMeans clusters
of CNN features: softmax + sparse CCE). Its best-validation weights seed the Target stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import mlflow
import numpy as np
import pandas as pd

from mstl import defaults
from mstl.data.images import decode_images_cached
from mstl.data.slices import check_two_classes
from mstl.models import OutputSpec, get_backbone
from mstl.tracking import MODEL_ID_TAG, log_params, log_table, start_stage_run
from mstl.tracking.inputs import load_manifest, load_soft_labels, log_export_input
from mstl.training.checkpoints import log_checkpoint, log_model_structure
from mstl.training.fit import distribution_scope, fit_classifier, set_seed
from mstl.training.params import ClassifierParams

STRATEGIES = ("hard", "soft")
GROUP_BY = ("patient", "series", "none")
GROUP_COLUMNS = {"patient": "patient_id", "series": "series_instance_uid"}


@dataclass(frozen=True)
class TransitionParams(ClassifierParams):
    """Parameters of `-e transition`."""

    manifest: str = ""
    labels: str = ""
    strategy: str = "hard"
    val_fraction: float = 0.2
    group_by: str = "patient"
    class_weights: str = "none"
    log_model: bool = False
    experiment: str = defaults.EXPERIMENT_NAME

    def validate(self) -> None:
        self.validate_network()
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; use one of {STRATEGIES}")
        if self.group_by not in GROUP_BY:
            raise ValueError(f"unknown group_by {self.group_by!r}; use one of {GROUP_BY}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.manifest:
            raise ValueError("manifest is required: the run ID of a prepare_transition run")
        if self.strategy == "soft" and not self.labels:
            raise ValueError(
                "strategy=soft needs labels: a soft_labels run ID or a CSV with file,cluster "
                "columns"
            )


def attach_labels(
    manifest: pd.DataFrame, params: TransitionParams
) -> tuple[pd.DataFrame, OutputSpec, int]:
    """Rows with a label in column ``y``, the output the task needs, and how many rows had no
    label."""
    if params.strategy == "hard":
        if "label" not in manifest or manifest["label"].isna().all():
            raise ValueError(
                "the manifest has no labels: run prepare_transition with labels_csv (or "
                "slices_root class folders), or use strategy=soft"
            )
        check_two_classes(manifest["label"], "the manifest")
        table = manifest.assign(y=manifest["label"])
    else:
        soft = load_soft_labels(params.labels)
        table = manifest.merge(soft, on="file", how="left").assign(y=lambda t: t["cluster"])
    unlabelled = int(table["y"].isna().sum())
    table = table[table["y"].notna()].reset_index(drop=True)
    table["y"] = table["y"].astype(int)
    classes = sorted(table["y"].unique())
    if classes != list(range(len(classes))):
        raise ValueError(f"labels must be 0..n-1, got {classes}")
    if params.strategy == "hard" and len(classes) == 2:
        output = OutputSpec("binary", 1)
    else:
        output = OutputSpec("categorical", len(classes))
    return table, output, unlabelled


def grouped_split(table: pd.DataFrame, group_by: str, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows: whole groups (patients by default) go to one side."""
    if group_by == "none":
        groups = np.arange(len(table))
    else:
        column = GROUP_COLUMNS[group_by]
        groups = table[column].astype(str).to_numpy()
        n = len(set(groups))
        if n < 2:
            raise ValueError(
                f"grouping by {group_by} needs at least 2 {group_by} groups, found {n} "
                f"({groups[0]}); "
                "use group_by=series or group_by=none"
            )
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    rng.shuffle(unique)
    sizes = pd.Series(groups).value_counts()
    val_groups, count = set(), 0
    for g in unique:
        if count >= val_fraction * len(table):
            break
        val_groups.add(g)
        count += sizes[g]
    if len(val_groups) == len(unique):  # keep at least one group for training
        val_groups.discard(unique[-1])
    return np.isin(groups, list(val_groups))


def class_weights_from(text: str, y: np.ndarray) -> dict[int, float] | None:
    """``none``, ``balanced`` (n / (k * count)), or explicit ``0=1,1=3``."""
    text = str(text).strip().lower()
    if text in ("none", ""):
        return None
    classes, counts = np.unique(y, return_counts=True)
    if text == "balanced":
        return {
            int(c): float(len(y) / (len(classes) * n))
            for c, n in zip(classes, counts, strict=False)
        }
    weights = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        try:
            weights[int(key)] = float(value)
        except ValueError:
            raise ValueError(
                f"class_weights must be none, balanced or like '0=1,1=3'; got {text!r}"
            ) from None
    return weights


def run_transition(params: TransitionParams) -> str:
    """Run the Transition stage inside one MLflow run; returns the run ID."""
    params.validate()
    set_seed(params.seed, params.deterministic)
    manifest, folder = load_manifest(params.manifest)
    table, output, unlabelled = attach_labels(manifest, params)
    is_val = grouped_split(table, params.group_by, params.val_fraction, params.seed)
    run_name = f"transition-{params.backbone}-{params.strategy}-s{params.seed}"
    with start_stage_run(
        params.experiment, run_name, log_system_metrics=params.log_system_metrics
    ) as run:
        mlflow.set_tags(
            {"stage": "transition", "backbone": params.backbone, "strategy": params.strategy}
        )
        log_params({k: v for k, v in asdict(params).items() if k != "experiment"})
        weights = log_transition_data(params, table, is_val, output, unlabelled)
        cache = params.array_cache()
        decoded = decode_images_cached(
            [str(folder / f) for f in table["file"]], params.preprocessing, cache=cache
        )
        y = table["y"].to_numpy().astype("float32" if output.kind == "binary" else "int32")
        with distribution_scope(params.distribute):
            model = params.build(output)
            log_model_structure(model)
            result = fit_classifier(
                model,
                (decoded.pixels[~is_val], y[~is_val]),
                (decoded.pixels[is_val], y[is_val]),
                get_backbone(params.backbone).preprocess_input,
                output,
                params.fit_config(weights),
                cache,
            )
        log_params(result.params(cache))
        mlflow.log_metrics(result.metrics() | {"decode_seconds": decoded.seconds})
        log_checkpoint(model)
        mlflow.set_tag(MODEL_ID_TAG, log_transition_model(model, params, run.info.run_id))
        return run.info.run_id


def log_transition_data(
    params: TransitionParams,
    table: pd.DataFrame,
    is_val: np.ndarray,
    output: OutputSpec,
    unlabelled: int,
) -> dict[int, float] | None:
    """Log the split's counts, classes and class weights (returned), its table and its input."""
    weights = class_weights_from(params.class_weights, table.loc[~is_val, "y"].to_numpy())
    log_params(
        {
            "n_train": int((~is_val).sum()),
            "n_val": int(is_val.sum()),
            "n_unlabelled": unlabelled,
            "n_classes": output.n_classes if output.kind == "categorical" else 2,
            "output": output.kind,
            "class_weight_values": weights,
        }
    )
    split_table = table.assign(split=np.where(is_val, "val", "train"))[
        ["file", "patient_id", "y", "split"]
    ]
    log_table(split_table, "data/split.csv")
    log_export_input(params.manifest, split_table, "training", targets="y")
    return weights


def log_transition_model(model, params: TransitionParams, run_id: str) -> str:
    """The model ID a Target run names as its input: the logged Keras model, or (by default) a
    model record for the checkpoint."""
    if params.log_model:
        return mlflow.keras.log_model(model, name="model").model_id
    return mlflow.create_external_model(
        name=f"transition-{params.backbone}-{params.strategy}",
        source_run_id=run_id,
        tags={
            "weights": "checkpoints/best.weights.h5",
            "backbone": params.backbone,
            "strategy": params.strategy,
        },
    ).model_id
