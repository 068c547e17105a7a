"""Train images/s of the project's Target fit against a plain Keras ``fit`` of the same network, in
the same run, for each paper backbone (random weights: speed does not depend on them), and the share
of a plain epoch that the frozen half costs (what the project computes once instead of every epoch).

    python benchmarks/bench_backbones.py --images 64 --epochs 3

Each backbone runs in its own process (peak RSS is that process's). Results are Markdown rows for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

BACKBONES = "mobilenet_025,resnet50v2,resnet101v2,densenet121,densenet169"


def measure(backbone: str, images: int, epochs: int, image_size: int, batch: int) -> dict:
    """One backbone: the project's fit (frozen half once, then the top each epoch) and a plain
    ``model.fit`` over the whole network with the same frozen layers, same data and seed."""
    import keras
    import numpy as np

    from mstl.data.pipeline import image_dataset
    from mstl.models import TARGET_OUTPUT, build_classifier, get_backbone
    from mstl.training.fit import FitConfig, fit_classifier, set_seed

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (images + batch, image_size, image_size), dtype=np.uint8)
    y = (np.arange(images + batch) % 2).astype("float32")
    train, val = (grey[:images], y[:images]), (grey[images:], y[images:])
    preprocess = get_backbone(backbone).preprocess_input
    config = FitConfig(epochs=epochs, batch_size=batch, log_to_mlflow=False)

    set_seed(0)
    model = build_classifier(backbone, "none", image_size, TARGET_OUTPUT)
    ours = fit_classifier(model, train, val, preprocess, TARGET_OUTPUT, config)

    set_seed(0)
    plain = build_classifier(backbone, "none", image_size, TARGET_OUTPUT)
    optimizer = keras.optimizers.SGD(1e-3, momentum=0.9)
    plain.compile(optimizer=optimizer, loss=TARGET_OUTPUT.loss, metrics=["accuracy"])
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        plain.fit(
            image_dataset(*train, preprocess, batch, True, 0),
            validation_data=image_dataset(*val, preprocess, batch),
            epochs=1,
            verbose=0,
        )
        seconds.append(time.perf_counter() - start)
    ours_epoch = float(np.median(ours.epoch_seconds[1:] or ours.epoch_seconds))
    plain_epoch = float(np.median(seconds[1:] or seconds))
    return {
        "backbone": backbone,
        "ours_images_per_s": images / ours_epoch,
        "plain_images_per_s": images / plain_epoch,
        "frozen_once_s": ours.frozen_seconds,
        "cached_frozen": ours.cached_frozen,
        "frozen_share_of_plain_epoch": max(0.0, 1 - ours_epoch / plain_epoch),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", default=BACKBONES)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--one", help="internal: the backbone to measure in this process")
    args = parser.parse_args()
    if args.one:
        row = measure(args.one, args.images, args.epochs, args.image_size, args.batch)
        print("RESULT " + json.dumps(row))
        return
    print(
        "| backbone | ours (img/s) | plain fit (img/s) | ratio | frozen half's share of a plain "
        "epoch | frozen half once (s) | peak RSS (MB) |\n"
        "| --- | --- | --- | --- | --- | --- | --- |"
    )
    for backbone in args.backbones.split(","):
        argv = [sys.executable, __file__, "--one", backbone, "--images", str(args.images),
                "--epochs", str(args.epochs), "--image-size", str(args.image_size),
                "--batch", str(args.batch)]  # fmt: skip
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        r = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        ratio = r["ours_images_per_s"] / r["plain_images_per_s"]
        print(
            f"| {r['backbone']} | {r['ours_images_per_s']:.1f} | {r['plain_images_per_s']:.1f} | "
            f"{ratio:.2f}x | {r['frozen_share_of_plain_epoch']:.0%} | {r['frozen_once_s']:.1f} | "
            f"{r['peak_rss_mb']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
