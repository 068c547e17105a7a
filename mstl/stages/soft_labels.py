"""The soft_labels stage: CNN features of the Transition slices, an Optuna search over the number of
KMeans clusters (each trial a nested MLflow run), and the labels CSV that `-e transition -P
strategy=soft` reads.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd

from mstl import defaults
from mstl.models.backbones import check_image_size, get_backbone
from mstl.soft_labels.clusters import (
    REDUCTIONS,
    cluster_labels,
    cluster_montages,
    criterion_figure,
    reduce_features,
)
from mstl.soft_labels.features import cached_features
from mstl.soft_labels.search import (
    CRITERIA,
    check_counts,
    check_features,
    fold_scores,
    parse_k_range,
    parse_k_values,
)
from mstl.tracking import log_figure, log_params, log_table, start_stage_run, tracking_uri
from mstl.tracking.inputs import load_manifest, log_export_input
from mstl.tracking.work import HEARTBEAT_SECONDS, claim, heartbeat_storage, run_shared


@dataclass(frozen=True)
class SoftLabelParams:
    """Parameters of `-e soft_labels`."""

    manifest: str = ""
    feature_backbone: str = "inceptionv3"
    weights: str = defaults.WEIGHTS
    image_size: int = defaults.IMAGE_SIZE
    k_values: str = defaults.K_VALUES
    k_range: str = ""
    n_trials: int = 20
    criterion: str = "silhouette"
    folds: int = 10
    reduce: str = "none"
    reduce_dim: int = 256
    storage: str = ""
    cache_dir: str = defaults.CACHE_DIR
    batch_size: int = defaults.BATCH_SIZE
    seed: int = defaults.SEED
    log_features: bool = True
    heartbeat_seconds: int = HEARTBEAT_SECONDS
    experiment: str = defaults.EXPERIMENT_NAME

    def validate(self) -> None:
        check_image_size(get_backbone(self.feature_backbone), self.image_size)
        if not self.manifest:
            raise ValueError("manifest is required: the run ID of a prepare_transition run")
        if self.criterion not in CRITERIA:
            raise ValueError(
                f"unknown criterion {self.criterion!r}; use one of {', '.join(CRITERIA)}"
            )
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"unknown reduce {self.reduce!r}; use one of {', '.join(REDUCTIONS)}")
        if self.folds < 2:
            raise ValueError(f"folds must be at least 2, got {self.folds}")
        if self.reduce != "none" and self.reduce_dim < 2:
            raise ValueError(f"reduce_dim must be at least 2, got {self.reduce_dim}")
        self.search_space()

    def search_space(self) -> tuple[list[int] | None, tuple[int, int] | None]:
        k_range = parse_k_range(self.k_range)
        if k_range and self.n_trials < 1:
            raise ValueError(f"n_trials must be at least 1 with k_range, got {self.n_trials}")
        return (None if k_range else parse_k_values(self.k_values)), k_range


def study_name(features_path: Path, params: SoftLabelParams) -> str:
    """Same features and search settings -> same study, so a killed search resumes."""
    shaping = {
        k: getattr(params, k)
        for k in ("k_values", "k_range", "criterion", "folds", "reduce", "reduce_dim", "seed")
    }
    digest = hashlib.sha256(
        (features_path.name + json.dumps(shaping, sort_keys=True)).encode()
    ).hexdigest()[:16]
    return f"soft-labels-{digest}"


def log_trial_run(client, parent, k: int, criterion: str, scores: list[float]) -> None:
    """A nested run per trial (what optuna-integration's MLflowCallback does, with the parent link
    explicit)."""
    child = client.create_run(
        parent.info.experiment_id,
        run_name=f"k={k}",
        tags={"mlflow.parentRunId": parent.info.run_id, "stage": "soft_labels_trial"},
    )
    run_id = child.info.run_id
    client.log_param(run_id, "k", k)
    client.log_param(run_id, "criterion", criterion)
    for fold, score in enumerate(scores):
        if np.isfinite(score):
            client.log_metric(run_id, "fold_score", score, step=fold)
    mean = float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")
    if np.isfinite(mean):
        client.log_metric(run_id, "mean_score", mean)
    client.set_terminated(run_id)


def open_study(params: SoftLabelParams, storage: str, name: str) -> optuna.Study:
    """Create, resume or join the study (TPE seeded; several workers may share it)."""
    return optuna.create_study(
        study_name=name,
        storage=heartbeat_storage(storage, params.heartbeat_seconds),
        sampler=optuna.samplers.TPESampler(seed=params.seed),
        direction="maximize",
        load_if_exists=True,
    )


def report_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    if trial.state == optuna.trial.TrialState.COMPLETE:
        print(f"  k={trial.params.get('k')}: {trial.value}", flush=True)


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def search_k(
    features: np.ndarray, params: SoftLabelParams, storage: str, name: str, parent
) -> optuna.Study:
    """Run (or resume, or join) the Optuna study; every evaluated k is logged as a nested MLflow
    run.

    Several workers may share one study (``storage`` on PostgreSQL or one sqlite file): on the grid
    of k values each k is evaluated once by one of them (``mstl.tracking.work``), a dead worker's k
    is retried once, and every worker returns with the whole grid complete.
    """
    grid, k_range = params.search_space()
    study = open_study(params, storage, name)
    client = mlflow.MlflowClient(tracking_uri())

    def evaluate(trial: optuna.Trial, k: int) -> float:
        scores = fold_scores(features, k, params.criterion, params.folds, params.seed)
        trial.set_user_attr("fold_scores", scores)
        log_trial_run(client, parent, k, params.criterion, scores)
        if not np.isfinite(scores).any():
            raise optuna.TrialPruned(
                f"criterion {params.criterion} undefined on every fold for k={k}"
            )
        return float(np.nanmean(scores))

    if grid:
        done = {t.params["k"] for t in completed(study)}
        print(f"searching k over {grid}: {len(set(grid) - done)} to evaluate, study {name}")
        run_shared(study, "k", grid, evaluate, callbacks=[report_trial])
    else:
        search_range(study, k_range, params.n_trials, evaluate)
    return study


def search_range(study: optuna.Study, k_range: tuple[int, int], n_trials: int, evaluate) -> None:
    """TPE over k in ``k_range`` until the study holds ``n_trials`` completed trials."""
    low, high = k_range

    def objective(trial: optuna.Trial) -> float:
        k = trial.suggest_int("k", low, high)
        claim(study, trial, "k", k)  # TPE may propose a k it has seen: prune, do not evaluate twice
        return evaluate(trial, k)

    done = len(completed(study))
    left = max(0, n_trials - done)
    if left:
        print(f"searching k in [{low}, {high}]: {left} trial(s) to run, {done} already done")
        study.optimize(objective, n_trials=left, catch=(), callbacks=[report_trial])


def run_soft_labels(params: SoftLabelParams) -> str:
    """Run the soft_labels stage inside one MLflow run; returns the run ID."""
    params.validate()
    manifest, folder = load_manifest(params.manifest)
    if manifest.empty:
        raise ValueError(f"the manifest of run {params.manifest} is empty: no slices to cluster")
    files = [folder / f for f in manifest["file"]]
    grid, k_range = params.search_space()
    k_max = max(grid) if grid else k_range[1]
    check_counts(len(files), params.folds, k_max)
    run_name = f"soft-labels-{params.feature_backbone}-{params.criterion}"
    with start_stage_run(params.experiment, run_name) as run:
        mlflow.set_tags(
            {
                "stage": "soft_labels",
                "feature_backbone": params.feature_backbone,
                "criterion": params.criterion,
            }
        )
        log_params({k: v for k, v in asdict(params).items() if k != "experiment"})
        raw, features_path = logged_features(params, files)
        check_features(raw, params.folds, k_max)
        log_export_input(params.manifest, manifest[["file"]], "clustering")
        features = reduce_features(raw, params.reduce, params.reduce_dim, params.seed)
        storage = params.storage or f"sqlite:///{(Path(params.cache_dir) / 'optuna.db').resolve()}"
        Path(params.cache_dir).mkdir(parents=True, exist_ok=True)
        name = study_name(features_path, params)
        log_params({"optuna_storage": storage, "optuna_study": name})
        study = search_k(features, params, storage, name, run)
        best_k = int(study.best_trial.params["k"])
        mlflow.log_metrics({"best_k": best_k, "best_score": float(study.best_value)})
        figure = criterion_figure(study, params.criterion, params.folds)
        log_figure(figure, "plots/criterion_vs_k.png")
        labels = cluster_labels(manifest["file"], features, best_k, params.seed)
        log_clusters(labels, files, f"k={best_k}, {params.criterion}")
        if str(storage).startswith("sqlite:///"):
            mlflow.log_artifact(str(storage)[len("sqlite:///") :], "optuna")
        sizes = labels["cluster"].value_counts().sort_index().to_dict()
        print(f"soft labels: k={best_k} ({params.criterion}={study.best_value:.4f}); sizes {sizes}")
        return run.info.run_id


def logged_features(params: SoftLabelParams, files: list[Path]) -> tuple[np.ndarray, Path]:
    """The slices' CNN features (from the feature cache when they were computed before), logged:
    whether reused, their size and hash, and the file itself with ``log_features``."""
    raw, features_path, reused = cached_features(
        files,
        params.feature_backbone,
        params.weights,
        params.image_size,
        Path(params.cache_dir) / "features",
        params.batch_size,
    )
    log_params(
        {
            "features_reused": reused,
            "n_slices": len(files),
            "feature_dim": raw.shape[1],
            "features_sha256": features_path.stem,
        }
    )
    if params.log_features:
        mlflow.log_artifact(str(features_path), "features")
    return raw, features_path


def log_clusters(labels: pd.DataFrame, files: list[Path], caption: str) -> None:
    """The labels CSV the Transition reads, the cluster sizes, and one montage per cluster."""
    log_table(labels, "labels.csv")
    sizes = labels["cluster"].value_counts().sort_index()
    log_table(sizes.rename_axis("cluster").reset_index(name="n_slices"), "cluster_sizes.csv")
    mlflow.log_metrics({f"cluster_{c}_size": int(n) for c, n in sizes.items()})
    with tempfile.TemporaryDirectory() as tmp:
        for name, sheet in cluster_montages(files, labels, caption).items():
            sheet.save(Path(tmp) / name)
        mlflow.log_artifacts(tmp, "montages")
