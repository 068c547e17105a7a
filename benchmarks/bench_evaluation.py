"""What a Target run spends after fitting on things it no longer does the slow way, measured in one
run against the way it did them before:

- the validation and test predictions and the test split's Grad-CAM pictures and shortcut probes,
  on the logged model and the real COVID-CT splits: eager calls (``model(x)`` per batch, and the
  Grad-CAM of Keras's own example: a probe model called under an eager ``GradientTape``, built for
  every batch) against one compiled forward pass (``predict.compiled_forward``) and one compiled
  ``GradCam`` per model. Each way starts from a freshly loaded model, so tracing is counted as a run
  pays it; the two give the same numbers, checked here;
- the percentile bootstrap of the test metrics (1,000 resamples of 203 images): ROC AUC by
  scikit-learn's ``roc_auc_score`` on every resample against the mid-rank (Mann-Whitney) AUC of
  ``metrics.roc_auc``;
- the served model's requirements: MLflow's inference (a subprocess that loads the model and records
  its imports) against the installation's pinned dependencies (``pyfunc.serving_requirements``).

    python benchmarks/bench_evaluation.py \
        --model-dir mlartifacts/models/<model id>/artifacts --data-root ../shared/data
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


def eager_gradcam(model, x) -> np.ndarray:
    """The Grad-CAM a Target run computed before: Keras's example, eager, a probe model per
    batch."""
    import keras
    import tensorflow as tf

    from mstl.evaluation.gradcam import last_conv_layer, scaled_to_peak, weighted_feature_map

    probe = keras.Model(
        model.inputs, [model.get_layer(last_conv_layer(model)).output, model.output]
    )
    x = tf.convert_to_tensor(x, tf.float32)
    with tf.GradientTape() as tape:
        features, output = probe(x, training=False)
        score = output[:, 0]
    return scaled_to_peak(
        weighted_feature_map(features, tape.gradient(score, features), x.shape[1:3]).numpy()
    )


def model_evaluation(
    model_dir: str, data_root: str, repeats: int
) -> list[tuple[str, float, float]]:
    """(step, before, now) seconds, best of ``repeats``, for the prediction and Grad-CAM work of a
    Target run's evaluation; raises if the two ways disagree."""
    import json
    from pathlib import Path

    import keras
    from sklearn.metrics import roc_auc_score

    from mstl.data import covid_ct
    from mstl.data.images import decode_images
    from mstl.data.pipeline import grey_to_input
    from mstl.data.preprocessing import Preprocessing
    from mstl.defaults import BATCH_SIZE
    from mstl.evaluation.gradcam import GradCam, error_sheet
    from mstl.evaluation.probes import (
        blank_lungs,
        lung_attention,
        lung_masks,
        mean_lung_attention,
        shortcut_probes,
    )
    from mstl.inference.predict import predict_grey
    from mstl.models import cache_cut_index, get_backbone, split_at_cut

    artifacts = Path(model_dir) / "artifacts"
    config = json.loads((artifacts / "config.json").read_text())
    preprocess = get_backbone(config["backbone"]).preprocess_input
    index = covid_ct.load_split(data_root, "official")
    decode = Preprocessing.from_config(config)
    train = decode_images(index.loc[index["split"] == "train", "path"].tolist(), decode).pixels
    val = decode_images(index.loc[index["split"] == "val", "path"].tolist(), decode).pixels
    test_rows = index["split"] == "test"
    test = decode_images(index.loc[test_rows, "path"].tolist(), decode).pixels
    labels = index.loc[test_rows, "label"].to_numpy()

    def batches(grey):
        return [
            np.asarray(grey_to_input(grey[i : i + BATCH_SIZE], preprocess))
            for i in range(0, len(grey), BATCH_SIZE)
        ]

    def before(model) -> dict:
        times, out = {}, {}
        bottom = split_at_cut(model, cache_cut_index(model))[0]
        start = time.perf_counter()
        out["frozen"] = np.concatenate(
            [np.asarray(bottom(x, training=False)) for g in (train, val) for x in batches(g)]
        )
        times["frozen"] = time.perf_counter() - start
        start = time.perf_counter()
        out["val"] = np.concatenate([np.asarray(model(x, training=False)) for x in batches(val)])[
            :, 0
        ]
        out["test"] = np.concatenate([np.asarray(model(x, training=False)) for x in batches(test)])[
            :, 0
        ]
        times["predictions"] = time.perf_counter() - start
        start = time.perf_counter()
        masks = lung_masks(test)
        heat = np.concatenate([eager_gradcam(model, x) for x in batches(test)])
        blanked = np.concatenate(
            [np.asarray(model(x, training=False)) for x in batches(blank_lungs(test, masks))]
        )[:, 0]
        found = masks.reshape(len(masks), -1).any(axis=1)
        out["probes"] = (
            mean_lung_attention(lung_attention(heat, masks), found),
            float(roc_auc_score(labels, blanked)),
        )
        eager_gradcam(model, batches(test[:9])[0])  # the error sheet's nine overlays
        times["probes"] = time.perf_counter() - start
        return times | {"out": out}

    def now(model) -> dict:
        times, out = {}, {}
        bottom = split_at_cut(model, cache_cut_index(model))[0]
        start = time.perf_counter()
        out["frozen"] = np.concatenate(
            [predict_grey(bottom, g, preprocess, BATCH_SIZE) for g in (train, val)]
        )
        times["frozen"] = time.perf_counter() - start
        start = time.perf_counter()
        out["val"] = predict_grey(model, val, preprocess, BATCH_SIZE)[:, 0]
        out["test"] = predict_grey(model, test, preprocess, BATCH_SIZE)[:, 0]
        times["predictions"] = time.perf_counter() - start
        start = time.perf_counter()
        cam = GradCam(model)
        probes = shortcut_probes(model, test, labels, preprocess, BATCH_SIZE, cam)
        out["probes"] = (probes["lung_attention"], probes["masked_lung_auc"])
        error_sheet(cam, test, labels, out["test"], preprocess, 0.5, "test slices")
        times["probes"] = time.perf_counter() - start
        return times | {"out": out}

    best: dict[str, dict[str, float]] = {"before": {}, "now": {}}
    results = {}
    for _ in range(repeats):
        for name, way in (("before", before), ("now", now)):
            model = keras.models.load_model(artifacts / "classifier.keras", compile=False)
            result = way(model)
            results[name] = result.pop("out")
            for step, value in result.items():
                best[name][step] = min(best[name].get(step, float("inf")), value)
    for key in ("frozen", "val", "test"):
        if not np.array_equal(results["before"][key], results["now"][key]):
            raise AssertionError(f"the {key} predictions differ between the two ways")
    if not np.allclose(results["before"]["probes"], results["now"]["probes"], rtol=1e-6):
        raise AssertionError(
            f"the probes differ: {results['before']['probes']} against {results['now']['probes']}"
        )
    return [
        (
            f"frozen half over the train and validation images ({len(train)} + {len(val)}, tracing "
            "included; a cache miss)",
            best["before"]["frozen"],
            best["now"]["frozen"],
        ),
        (
            f"validation and test predictions ({len(val)} + {len(test)} images, tracing included)",
            best["before"]["predictions"],
            best["now"]["predictions"],
        ),
        (
            f"Grad-CAM error sheet and shortcut probes ({len(test)} test images)",
            best["before"]["probes"],
            best["now"]["probes"],
        ),
    ]


def main() -> None:
    from mlflow.utils.environment import infer_pip_requirements

    from mstl.evaluation.metrics import bootstrap, bootstrap_metrics, point_metrics
    from mstl.inference.pyfunc import serving_requirements

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir",
        required=True,
        help="a logged Target model's artifacts folder (holds MLmodel)",
    )
    parser.add_argument(
        "--images", type=int, default=203, help="test images (the official split has 203)"
    )
    parser.add_argument(
        "--data-root", default="../shared/data", help="holds covid-ct/ (the official split is used)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="runs of each way over the model; the best is reported",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="TensorFlow threads (a grid worker uses one)"
    )
    args = parser.parse_args()
    from mstl.training.fit import set_threads

    set_threads(args.threads)
    model_steps = model_evaluation(args.model_dir, args.data_root, args.repeats)
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
    for step, old, new in model_steps:
        print(f"| {step} | {old:.2f} | {new:.2f} | {old / new:.1f}x |")
    print(
        f"| bootstrap of the test metrics, {args.images} images | {old_boot:.2f} | {new_boot:.2f} "
        f"| {old_boot / new_boot:.0f}x |"
    )
    print(
        f"| the served model's requirements | {old_req:.2f} | {new_req:.3f} | "
        f"{old_req / new_req:.0f}x |"
    )


if __name__ == "__main__":
    main()
