"""The soft_labels stage: CNN features of the Transition slices, an Optuna search over the number of
KMeans clusters (each trial a nested MLflow run), and the labels CSV that `-e transition -P
strategy=soft`
reads.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import optuna
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.random_projection import GaussianRandomProjection

from mstl import defaults
from mstl.data.images import load_grey
from mstl.data.montage import montage
from mstl.models.backbones import check_image_size, get_backbone
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

REDUCTIONS = ("none", "pca", "random")


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


def reduce_features(features: np.ndarray, method: str, dim: int, seed: int) -> np.ndarray:
    """Optional PCA or Gaussian random projection before clustering (off by default)."""
    if method == "none":
        return np.asarray(features)
    dim = min(dim, features.shape[1], len(features) if method == "pca" else features.shape[1])
    if method == "pca":
        return PCA(n_components=dim, random_state=seed).fit_transform(features).astype(np.float32)
    return (
        GaussianRandomProjection(n_components=dim, random_state=seed)
        .fit_transform(features)
        .astype(np.float32)
    )


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


def search_k(
    features: np.ndarray, params: SoftLabelParams, storage: str, name: str, parent
) -> optuna.Study:
    """Run (or resume, or join) the Optuna study; every evaluated k is logged as a nested MLflow
    run.

    Several workers may share one study (``storage`` on PostgreSQL or one sqlite file): on the grid
    of
    k values each k is evaluated once by one of them (``mstl.tracking.work``), a dead worker's k is
    retried once, and every worker returns with the whole grid complete.
    """
    grid, k_range = params.search_space()
    study = optuna.create_study(
        study_name=name,
        storage=heartbeat_storage(storage, params.heartbeat_seconds),
        sampler=optuna.samplers.TPESampler(seed=params.seed),
        direction="maximize",
        load_if_exists=True,
    )
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

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            print(f"  k={trial.params.get('k')}: {trial.value}", flush=True)

    if grid:
        done = {
            t.params["k"]
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        }
        print(
            f"searching k over {grid}: {len(set(grid) - done)} to evaluate, shared through study "
            f"{name}"
        )
        run_shared(study, "k", grid, evaluate, callbacks=[report])
        return study

    low, high = k_range

    def objective(trial: optuna.Trial) -> float:
        k = trial.suggest_int("k", low, high)
        claim(study, trial, "k", k)  # TPE may propose a k it has seen: prune, do not evaluate twice
        return evaluate(trial, k)

    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    n_trials = max(0, params.n_trials - done)
    if n_trials:
        print(
            f"searching k in [{low}, {high}]: {n_trials} trial(s) to run, {done} already done "
            f"(study {name})"
        )
        study.optimize(objective, n_trials=n_trials, catch=(), callbacks=[report])
    return study


def criterion_figure(study: optuna.Study, criterion: str, folds: int):
    trials = sorted(
        (t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
        key=lambda t: t.params["k"],
    )
    ks = [t.params["k"] for t in trials]
    means = [t.value for t in trials]
    spread = [np.nanstd(t.user_attrs.get("fold_scores", [np.nan])) for t in trials]
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.errorbar(ks, means, yerr=spread, marker="o", capsize=3)
    ax.set(
        xlabel="k (clusters)",
        ylabel=f"{criterion} (held-out, mean ± SD over {folds} folds)",
        title=f"choosing k by {criterion}",
    )
    if len(ks) > 1 and max(ks) / min(ks) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    fig.tight_layout()
    return fig


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
    with start_stage_run(
        params.experiment, f"soft-labels-{params.feature_backbone}-{params.criterion}"
    ) as run:
        mlflow.set_tags(
            {
                "stage": "soft_labels",
                "feature_backbone": params.feature_backbone,
                "criterion": params.criterion,
            }
        )
        log_params({k: v for k, v in asdict(params).items() if k != "experiment"})
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
        check_features(raw, params.folds, k_max)
        log_export_input(params.manifest, manifest[["file"]], "clustering")
        if params.log_features:
            mlflow.log_artifact(str(features_path), "features")
        features = reduce_features(raw, params.reduce, params.reduce_dim, params.seed)
        storage = params.storage or f"sqlite:///{(Path(params.cache_dir) / 'optuna.db').resolve()}"
        Path(params.cache_dir).mkdir(parents=True, exist_ok=True)
        name = study_name(features_path, params)
        log_params({"optuna_storage": storage, "optuna_study": name})
        study = search_k(features, params, storage, name, run)
        best_k = int(study.best_trial.params["k"])
        mlflow.log_metrics({"best_k": best_k, "best_score": float(study.best_value)})
        log_figure(
            criterion_figure(study, params.criterion, params.folds), "plots/criterion_vs_k.png"
        )

        final = KMeans(n_clusters=best_k, n_init=10, random_state=params.seed).fit(features)
        labels = pd.DataFrame({"file": manifest["file"], "cluster": final.labels_.astype(int)})
        log_table(labels, "labels.csv")
        sizes = labels["cluster"].value_counts().sort_index()
        log_table(sizes.rename_axis("cluster").reset_index(name="n_slices"), "cluster_sizes.csv")
        mlflow.log_metrics({f"cluster_{c}_size": int(n) for c, n in sizes.items()})
        with tempfile.TemporaryDirectory() as tmp:
            for cluster in sizes.index:
                members = labels.index[labels["cluster"] == cluster]
                picked = members[
                    np.linspace(0, len(members) - 1, min(24, len(members))).round().astype(int)
                ]
                sheet = montage(
                    [load_grey(files[i], 128) for i in picked],
                    [""] * len(picked),
                    columns=8,
                    title=f"cluster {cluster}: {sizes[cluster]} slices "
                    f"(k={best_k}, {params.criterion})",
                )
                sheet.save(Path(tmp) / f"cluster_{cluster:02d}.png")
            mlflow.log_artifacts(tmp, "montages")
        if str(storage).startswith("sqlite:///"):
            mlflow.log_artifact(str(storage)[len("sqlite:///") :], "optuna")
        print(
            f"soft labels: k={best_k} ({params.criterion}={study.best_value:.4f}); sizes "
            f"{sizes.to_dict()}"
        )
        return run.info.run_id
