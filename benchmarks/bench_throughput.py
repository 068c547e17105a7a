"""Training throughput (images/s) of the Target network at 224 px: full forward + backward steps of
batch 32 with the paper's frozen half, on whatever device TensorFlow sees (CPU here; on a GPU
machine pass --mixed-precision to compare float32 with mixed float16).

    python benchmarks/bench_throughput.py --backbones mobilenet_025,densenet121
    python benchmarks/bench_throughput.py --backbones densenet121,densenet169 --mixed-precision
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(backbone: str, image_size: int, batch: int, steps: int, policy: str) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(policy)
    from mstl.models import TARGET_OUTPUT, build_classifier

    model = build_classifier(backbone, "none", image_size, TARGET_OUTPUT)
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype("float32")
    y = rng.integers(0, 2, (batch, 1)).astype("float32")
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # trace and warm up
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    return {
        "backbone": backbone,
        "policy": policy,
        "device": device,
        "image_size": image_size,
        "batch": batch,
        "steps": steps,
        "images_per_s": batch * steps / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", default="mobilenet_025,densenet121")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mixed-precision", action="store_true", help="also measure mixed_float16")
    parser.add_argument("--one", help="internal: backbone:policy to measure in this process")
    args = parser.parse_args()
    if args.one:
        backbone, policy = args.one.split(":")
        print(json.dumps(measure(backbone, args.image_size, args.batch, args.steps, policy)))
        return
    policies = ["float32"] + (["mixed_float16"] if args.mixed_precision else [])
    rows = []
    for backbone in args.backbones.split(","):
        for policy in policies:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    f"{backbone}:{policy}",
                    "--image-size",
                    str(args.image_size),
                    "--batch",
                    str(args.batch),
                    "--steps",
                    str(args.steps),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| backbone | device | policy | images/s |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['backbone']} | {r['device']} | {r['policy']} | {r['images_per_s']:.1f} |")


if __name__ == "__main__":
    main()
