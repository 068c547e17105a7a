"""The soft-label search at the paper's scale, and feature-extraction throughput.

1. scale: synthetic features of the paper's shape, 10,176 slices x 51,200 values (InceptionV3's
   5 x 5 x 2048 at 224 px), float32 (2.1 GB), with 8 planted clusters; the whole default search
   (grid {2,4,8,16}, 10-fold CV, silhouette) through Optuna with every trial logged to MLflow.
   Wall time and peak RSS (budget: 30 minutes, 8 GB on the 2-core machine).
2. throughput: feature extraction (decode, preprocess, conv base, flatten) in slices/s on CPU at
   224 px for InceptionV3 and MobileNet-0.25, on real slices from ../shared (iq-oth-nccd).

Each part runs in its own process so its peak memory is its own.

    python benchmarks/bench_soft_labels.py scale
    python benchmarks/bench_soft_labels.py throughput
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def scale(n: int, d: int, clusters: int, folds: int, k_values: str) -> dict:
    import mlflow
    import numpy as np

    from mstl.stages.soft_labels import SoftLabelParams, search_k

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (clusters, d)).astype(np.float32)
    truth = rng.integers(0, clusters, n)
    features = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 512):
        stop = min(n, start + 512)
        features[start:stop] = centers[truth[start:stop]] + rng.normal(
            0, 3.0, (stop - start, d)
        ).astype(np.float32)
    made = peak_mb()
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        params = SoftLabelParams(manifest="synthetic", k_values=k_values, folds=folds)
        start = time.perf_counter()
        with mlflow.start_run() as parent:
            study = search_k(features, params, f"sqlite:///{tmp}/optuna.db", "bench", parent)
        seconds = time.perf_counter() - start
    scores = {t.params["k"]: t.value for t in study.trials}
    return {
        "slices": n,
        "dim": d,
        "gigabytes": features.nbytes / 1e9,
        "folds": folds,
        "k_values": k_values,
        "search_seconds": seconds,
        "best_k": study.best_trial.params["k"],
        "scores": scores,
        "peak_rss_mb": peak_mb(),
        "rss_after_data_mb": made,
    }


def throughput(shared: str, n: int) -> list[dict]:
    from mstl.soft_labels.features import extract_features

    folder = Path(shared) / "data" / "iq-oth-nccd" / "Normal cases"
    files = sorted(folder.iterdir())[:n]
    rows = []
    for backbone, weights in (("mobilenet_025", "imagenet"), ("inceptionv3", "none")):
        extract_features(files[:32], backbone, weights, 224)  # warm-up: build and trace
        start = time.perf_counter()
        features = extract_features(files, backbone, weights, 224)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "backbone": backbone,
                "weights": weights,
                "slices": len(files),
                "dim": features.shape[1],
                "seconds": seconds,
                "slices_per_s": len(files) / seconds,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=["scale", "throughput"])
    parser.add_argument("--slices", type=int, default=10_176)
    parser.add_argument("--dim", type=int, default=51_200)
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--k-values", default="2,4,8,16")
    parser.add_argument(
        "--shared", default=os.environ.get("MSTL_SHARED", str(REPO.parent / "shared"))
    )
    parser.add_argument("--throughput-slices", type=int, default=256)
    args = parser.parse_args()
    if args.part == "scale":
        print(json.dumps(scale(args.slices, args.dim, args.clusters, args.folds, args.k_values)))
    else:
        for row in throughput(args.shared, args.throughput_slices):
            print(json.dumps({**row, "peak_rss_mb": peak_mb()}))


if __name__ == "__main__":
    main()
