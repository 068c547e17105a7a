"""What a Target run spends after fitting on two things it no longer does the slow way, measured in one run
against the way it did them before:

- the percentile bootstrap of the test metrics (1,000 resamples of 203 images): ROC AUC by scikit-learn's
  ``roc_auc_score`` on every resample against the mid-rank (Mann-Whitney) AUC of ``metrics.roc_auc``;
- the served model's requirements: MLflow's inference (a subprocess that loads the model and records
  its imports) against the installation's pinned dependencies (``serving.serving_requirements``).

    python benchmarks/bench_evaluation.py --model-dir mlartifacts/models/<model id>/artifacts
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn import metrics as skm


def seconds(task, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        task()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    from mlflow.utils.environment import infer_pip_requirements

    from mstl.evaluation.metrics import bootstrap, bootstrap_metrics, point_metrics
    from mstl.serving import serving_requirements

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="a logged Target model's artifacts folder (holds MLmodel)")
    parser.add_argument("--images", type=int, default=203, help="test images (the official split has 203)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, args.images)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, args.images), 0, 1)

    def before() -> dict:
        def with_sklearn(a, b):
            return point_metrics(a, b) | {"roc_auc": float(skm.roc_auc_score(a, b))}

        return bootstrap(with_sklearn, y, p)

    old_boot, new_boot = seconds(before), seconds(lambda: bootstrap_metrics(y, p))
    old_req = seconds(lambda: infer_pip_requirements(args.model_dir, "python_function"), repeats=1)
    new_req = seconds(serving_requirements)
    print("| step | before (s) | now (s) | ratio |\n| --- | --- | --- | --- |")
    print(
        f"| bootstrap of the test metrics, {args.images} images | {old_boot:.2f} | {new_boot:.2f} | {old_boot / new_boot:.0f}x |"
    )
    print(f"| the served model's requirements | {old_req:.2f} | {new_req:.3f} | {old_req / new_req:.0f}x |")


if __name__ == "__main__":
    main()
