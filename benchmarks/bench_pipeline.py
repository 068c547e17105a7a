"""Epoch time of the Target pipeline against the plain peer approach, measured in one run.

Every variant does what a Target epoch does: train on the official train split (425 images) and
validate on the val split (118), COVID-CT at 224 px, MobileNet-0.25 (ImageNet) with the same frozen
half, batch 32, SGD.

- peer: ``keras.utils.image_dataset_from_directory`` over a train/ and val/ folder of links to the
  images (the usual layout for it), no cache: every epoch decodes and resizes every PNG/JPG again;
- ours, decode once + tf.data cache, full network every step (``cache_frozen=false``);
- ours, + frozen half computed once (the default);
- ours, + frozen half computed once and BatchNorm of the trained half frozen too
(``train_batchnorm=false``).

Each variant runs in its own process so its peak memory (max RSS) is its own.
Writes JSON lines to --out and a Markdown table to stdout.

    python benchmarks/bench_pipeline.py --data-root ../shared/data --epochs 4
    python benchmarks/bench_pipeline.py --variants
    decode_once_cache,decode_once_cache_frozen_features \
        --repeats 3 --threads 1   # two variants in turn, three times each
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = (
    "peer_image_dataset_from_directory",
    "decode_once_cache",
    "decode_once_cache_frozen_features",
    "frozen_features_frozen_batchnorm",
)


def run_variant(
    variant: str, data_root: str, epochs: int, image_size: int, batch_size: int, threads: int = 0
) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from mstl.data import covid_ct
    from mstl.data.images import decode_images
    from mstl.models import TARGET_OUTPUT, build_classifier, get_backbone
    from mstl.training.fit import EpochTimer, FitConfig, fit_classifier, set_seed, set_threads

    set_threads(threads)
    set_seed(0)
    spec = get_backbone("mobilenet_025")
    model = build_classifier(
        "mobilenet_025",
        "imagenet",
        image_size,
        TARGET_OUTPUT,
        train_batchnorm=(variant != VARIANTS[3]),
    )
    index = covid_ct.load_split(data_root, "official")
    train, val = index[index["split"] == "train"], index[index["split"] == "val"]
    start = time.perf_counter()
    if variant == VARIANTS[0]:
        import tempfile

        links = Path(tempfile.mkdtemp(prefix="peer-"))
        for part, table in (("train", train), ("val", val)):
            for path, cls in zip(table["path"], table["class"], strict=False):
                (links / part / cls).mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.abspath(path), links / part / cls / Path(path).name)

        def folder(part, shuffle):
            ds = keras.utils.image_dataset_from_directory(
                links / part,
                class_names=["NonCOVID", "COVID"],
                label_mode="binary",
                image_size=(image_size, image_size),
                batch_size=batch_size,
                shuffle=shuffle,
                seed=0,
                verbose=False,
            )
            return ds.map(lambda x, y: (spec.preprocess_input(x), y)).prefetch(tf.data.AUTOTUNE)

        model.compile(
            optimizer=keras.optimizers.SGD(1e-3, momentum=0.9),
            loss="binary_crossentropy",
            metrics=["accuracy"],
        )
        timer = EpochTimer()
        model.fit(
            folder("train", True),
            validation_data=folder("val", False),
            epochs=epochs,
            callbacks=[timer],
            verbose=0,
        )
        epoch_seconds = timer.seconds
    else:
        decoded = decode_images(index["path"].tolist(), image_size)
        y = index["label"].to_numpy().astype("float32")
        is_train, is_val = (
            (index["split"] == "train").to_numpy(),
            (index["split"] == "val").to_numpy(),
        )
        config = FitConfig(
            epochs=epochs,
            batch_size=batch_size,
            log_to_mlflow=False,
            cache_frozen=(variant != VARIANTS[1]),
        )
        result = fit_classifier(
            model,
            (decoded.pixels[is_train], y[is_train]),
            (decoded.pixels[is_val], y[is_val]),
            spec.preprocess_input,
            TARGET_OUTPUT,
            config,
        )
        epoch_seconds = result.epoch_seconds
    n = len(train)
    total = time.perf_counter() - start
    later = epoch_seconds[1:] or epoch_seconds
    return {
        "variant": variant,
        "train_images": n,
        "image_size": image_size,
        "epochs": epochs,
        "first_epoch_s": epoch_seconds[0],
        "later_epoch_s": float(np.median(later)),
        "later_images_per_s": n / float(np.median(later)),
        "total_s": total,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", default=os.environ.get("MSTL_SHARED", "../shared") + "/data")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--variant", choices=VARIANTS, help="run one variant in this process (internal)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="TensorFlow threads (0: its default)"
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, run in this order"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="run the variants in turn this many times"
    )
    parser.add_argument("--out", default="bench-out/pipeline.jsonl")
    args = parser.parse_args()
    if args.variant:
        print(
            json.dumps(
                run_variant(
                    args.variant,
                    args.data_root,
                    args.epochs,
                    args.image_size,
                    args.batch_size,
                    args.threads,
                )
            )
        )
        return
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    rows = []
    for variant in variants * args.repeats:
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--data-root",
            args.data_root,
            "--epochs",
            str(args.epochs),
            "--image-size",
            str(args.image_size),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{variant}: {rows[-1]}", flush=True)
    peer = statistics.median(r["later_epoch_s"] for r in rows if r["variant"] == variants[0])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for row in rows:
            row["speedup_vs_peer"] = peer / row["later_epoch_s"]
            f.write(json.dumps(row) + "\n")
    print(f"\nspeed-up against {variants[0]} (the median of its runs)")
    print(
        "\n| variant | first epoch (s) | later epochs (s, median) | images/s | speed-up vs peer | "
        "peak RSS (MB) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['variant']} | {r['first_epoch_s']:.1f} | {r['later_epoch_s']:.2f} | "
            f"{r['later_images_per_s']:.0f} "
            f"| {r['speedup_vs_peer']:.1f}x | {r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
