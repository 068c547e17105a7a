"""What the search's result becomes: features reduced before clustering, the final clustering at
the chosen k, the criterion-against-k figure and a montage per cluster."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import optuna
import pandas as pd
from PIL import Image
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.random_projection import GaussianRandomProjection

from mstl.data.images import load_grey
from mstl.data.montage import montage

REDUCTIONS = ("none", "pca", "random")
MONTAGE_SLICES = 24  # evenly spaced members shown per cluster


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


def cluster_labels(files: list[str], features: np.ndarray, k: int, seed: int) -> pd.DataFrame:
    """(file, cluster) from KMeans at the chosen k, ten starts, seeded."""
    final = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(features)
    return pd.DataFrame({"file": files, "cluster": final.labels_.astype(int)})


def cluster_montages(
    paths: list[Path], labels: pd.DataFrame, caption: str
) -> dict[str, Image.Image]:
    """One sheet per cluster of up to MONTAGE_SLICES evenly spaced members, to see what a cluster
    holds; ``caption`` ends each title (e.g. ``k=4, silhouette``)."""
    sizes = labels["cluster"].value_counts().sort_index()
    sheets = {}
    for cluster in sizes.index:
        members = labels.index[labels["cluster"] == cluster]
        shown = min(MONTAGE_SLICES, len(members))
        picked = members[np.linspace(0, len(members) - 1, shown).round().astype(int)]
        sheets[f"cluster_{cluster:02d}.png"] = montage(
            [load_grey(paths[i], 128) for i in picked],
            [""] * len(picked),
            columns=8,
            title=f"cluster {cluster}: {sizes[cluster]} slices ({caption})",
        )
    return sheets
