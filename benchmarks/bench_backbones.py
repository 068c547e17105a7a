"""Train images/s of the project's Target fit against a plain Keras ``fit`` of the same network, in
the same process, for each paper backbone (random weights: speed does not depend on them) and
MobileNet-0.25, and what the frozen lower half costs.

    python benchmarks/bench_backbones.py  # 192 + 64 slices, 224 px, 3 epochs: docs/benchmarks.md
    python benchmarks/bench_backbones.py --image-size 64 --images 64 --val 32 --steps 2  # smoke

Per backbone, one process (peak RSS is that process's), two measurements:

- **fit**: ``fit_classifier`` (frozen half computed once, then the trained top each epoch) and a
  plain ``model.fit`` of the same network (frozen layers non-trainable, full forward every step),
  same synthetic slices, seed, optimiser and batch; each epoch trains and validates, as a Target
  epoch does. Steady epochs exclude the first (tracing); the one-off frozen pass is reported on its
  own. The order of the two fits alternates from backbone to backbone.
- **step**: on one batch, interleaved round by round, the frozen half's forward (the project's
  compiled forward), a full training step of the plain network, and a training step of the top on
  the frozen features: the frozen half's share of a plain step, with no data pipeline around it.

The last line per backbone is ``RESULT {json}``; the parent prints a Markdown table of them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from mstl.data.pipeline import grey_to_input, image_dataset
from mstl.inference.predict import compiled_forward
from mstl.models import TARGET_OUTPUT, build_classifier, cache_cut_index, get_backbone
from mstl.models.classifier import split_at_cut
from mstl.training import fit as fit_module
from mstl.training.fit import EpochTimer, FitConfig, fit_classifier, set_seed

BACKBONES = "mobilenet_025,resnet50v2,resnet101v2,densenet121,densenet169"
MOBILENET_WEIGHTS = "/work/shared/weights/mobilenet_2_5_224_tf_no_top.h5"
RUN_EPOCHS = 60  # the paper's Target run, for the one-off pass's share of a whole run

Data = tuple[np.ndarray, np.ndarray]


def synthetic(images: int, val: int, size: int) -> tuple[Data, Data]:
    """Random uint8 grey slices with alternating labels: speed does not depend on the pixels."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (images + val, size, size), dtype=np.uint8)
    y = (np.arange(images + val) % 2).astype("float32")
    return (grey[:images], y[:images]), (grey[images:], y[images:])


def build(backbone: str, weights: str, image_size: int) -> keras.Model:
    set_seed(0)
    return build_classifier(backbone, weights, image_size, TARGET_OUTPUT)


def run_ours(model: keras.Model, train: Data, val: Data, preprocess, config: FitConfig) -> dict:
    """The project's fit; its epochs exclude the one-off frozen pass, reported apart."""
    result = fit_classifier(model, train, val, preprocess, TARGET_OUTPUT, config)
    if not result.cached_frozen:
        raise RuntimeError(f"{model.name}: fit_classifier did not cache the frozen half")
    return {"epochs": result.epoch_seconds, "frozen_s": result.frozen_seconds}


def run_plain(model: keras.Model, train: Data, val: Data, preprocess, config: FitConfig) -> dict:
    """A plain Keras fit of the same network: the same optimiser, batches and shuffling, the whole
    network every step (the frozen layers only forward, as they are non-trainable)."""
    model.compile(
        optimizer=keras.optimizers.SGD(config.learning_rate, momentum=config.momentum),
        loss=TARGET_OUTPUT.loss,
        metrics=["accuracy"],
    )
    timer = EpochTimer()
    model.fit(
        image_dataset(*train, preprocess, config.batch_size, True, config.seed),
        validation_data=image_dataset(*val, preprocess, config.batch_size),
        epochs=config.epochs,
        callbacks=[timer],
        verbose=2,
    )
    return {"epochs": timer.seconds}


def time_call(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def step_times(model: keras.Model, cut: int, grey: np.ndarray, preprocess, rounds: int) -> dict:
    """Median seconds of the frozen forward, a plain full step and a top step on one batch,
    interleaved per round after one untimed warm-up round (tracing)."""
    bottom, top = split_at_cut(model, cut)
    top.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss=TARGET_OUTPUT.loss)
    x = tf.convert_to_tensor(grey_to_input(grey, preprocess))
    y = tf.convert_to_tensor((np.arange(len(grey)) % 2).astype("float32")[:, None])
    forward = compiled_forward(bottom)
    features = forward(x)
    calls = {
        "frozen_forward": lambda: forward(x).numpy(),
        "plain_step": lambda: model.train_on_batch(x, y),
        "top_step": lambda: top.train_on_batch(features, y),
    }
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(rounds + 1):
        for name, call in calls.items():
            elapsed = time_call(call)
            if round_:
                seconds[name].append(elapsed)
    return {name: float(np.median(values)) for name, values in seconds.items()}


def fit_module_digest() -> str:
    """Which ``mstl/training/fit.py`` was measured (it may be changing under other work)."""
    return hashlib.sha256(Path(fit_module.__file__).read_bytes()).hexdigest()[:12]


def measure(backbone: str, args: argparse.Namespace, plain_first: bool) -> dict:
    """One backbone: the two fits in the given order, then the step timings."""
    load_before = os.getloadavg()[0]  # the machine is shared: how busy it was, 1-minute average
    weights = args.mobilenet_weights if backbone == "mobilenet_025" else "none"
    train, val = synthetic(args.images, args.val, args.image_size)
    preprocess = get_backbone(backbone).preprocess_input
    config = FitConfig(epochs=args.epochs, batch_size=args.batch, log_to_mlflow=False)
    ours_model, plain_model = (build(backbone, weights, args.image_size) for _ in range(2))
    cut = cache_cut_index(plain_model)
    if cut is None:
        raise RuntimeError(f"{backbone}: no layer to cut the frozen half at")
    runs = [("plain", run_plain, plain_model), ("ours", run_ours, ours_model)]
    timings = {
        name: run(model, train, val, preprocess, config)
        for name, run, model in (runs if plain_first else runs[::-1])
    }
    steps = step_times(plain_model, cut, train[0][: args.batch], preprocess, args.steps)
    cut_shape = tuple(int(d) for d in plain_model.layers[cut].output.shape[1:])
    return {
        "backbone": backbone,
        "weights": "imagenet (shared file)" if weights != "none" else "random",
        "order": "plain, ours" if plain_first else "ours, plain",
        "cut_layer": plain_model.layers[cut].name,
        "cut_shape": cut_shape,
        "feature_mb_per_image": 4 * int(np.prod(cut_shape)) / 1e6,
        "ours_epochs_s": timings["ours"]["epochs"],
        "plain_epochs_s": timings["plain"]["epochs"],
        "frozen_once_s": timings["ours"]["frozen_s"],
        "steps_s": steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "fit_py": fit_module_digest(),
        "images": args.images,
        "val": args.val,
        "batch": args.batch,
        "load_before_after": [load_before, os.getloadavg()[0]],
    }


def derived(r: dict) -> dict:
    """The table's figures from one backbone's raw timings. Steady epochs: the median of the epochs
    after the first. A 60-epoch run: the first (tracing) epoch, 59 steady ones and, for ours, the
    one-off frozen pass."""
    ours_first, plain_first = r["ours_epochs_s"][0], r["plain_epochs_s"][0]
    ours = float(np.median(r["ours_epochs_s"][1:]))
    plain = float(np.median(r["plain_epochs_s"][1:]))
    frozen, steps = r["frozen_once_s"], r["steps_s"]
    ours_run = frozen + ours_first + (RUN_EPOCHS - 1) * ours
    plain_run = plain_first + (RUN_EPOCHS - 1) * plain
    batches = -(-r["images"] // r["batch"]) + -(-r["val"] // r["batch"])
    return {
        "ours_ips": r["images"] / ours,
        "plain_ips": r["images"] / plain,
        "ratio": plain / ours,
        "frozen_compute_s": batches * steps["frozen_forward"],
        "frozen_in_epochs": frozen / ours,
        "frozen_share_run": frozen / ours_run,
        "run_ratio": plain_run / ours_run,
        "frozen_share_step": steps["frozen_forward"] / steps["plain_step"],
        "step_ratio": steps["plain_step"] / steps["top_step"],
    }


HEADER = (
    "| backbone | weights | ours (train img/s) | plain fit (train img/s) | **ratio** "
    "| frozen pass once, s (of it computing) | frozen pass in ours' epochs "
    "| its share of a 60-epoch run | 60-epoch ratio | frozen half's share of a plain step "
    "| step ratio plain/top | peak RSS (MB) |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def row(r: dict) -> str:
    d = derived(r)
    return (
        f"| {r['backbone']} | {r['weights']} | {d['ours_ips']:.1f} | {d['plain_ips']:.1f} | "
        f"**{d['ratio']:.2f}x** | {r['frozen_once_s']:.1f} ({d['frozen_compute_s']:.1f}) | "
        f"{d['frozen_in_epochs']:.2f} | {d['frozen_share_run']:.1%} | {d['run_ratio']:.2f}x | "
        f"{d['frozen_share_step']:.0%} | {d['step_ratio']:.2f}x | {r['peak_rss_mb']:.0f} |"
    )


def run_child(backbone: str, args: argparse.Namespace, plain_first: bool) -> dict:
    """Measure one backbone in a fresh process; its log goes to stderr as it runs."""
    argv = [sys.executable, __file__, "--one", backbone, *(["--plain-first"] * plain_first)]
    for name in ("images", "val", "epochs", "image_size", "batch", "steps", "mobilenet_weights"):
        argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    print(proc.stdout, file=sys.stderr, flush=True)  # Keras's epoch lines, for the record
    if proc.returncode:
        raise RuntimeError(f"{backbone}: measuring process exited with {proc.returncode}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", default=BACKBONES)
    parser.add_argument("--images", type=int, default=192, help="training slices")
    parser.add_argument("--val", type=int, default=64, help="validation slices")
    parser.add_argument("--epochs", type=int, default=3, help="per fit; the first is a warm-up")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed rounds of the step timings")
    parser.add_argument("--mobilenet-weights", default=MOBILENET_WEIGHTS, help="file, or none")
    parser.add_argument("--json", help="also write every backbone's raw result to this file")
    parser.add_argument("--table", help="only print the table of a --json file written before")
    parser.add_argument("--one", help="internal: the backbone to measure in this process")
    parser.add_argument("--plain-first", action="store_true", help="internal: fit order")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error(f"--epochs must be at least 2 (the first is a warm-up), got {args.epochs}")
    if args.images < args.batch or args.val < 1:
        parser.error(f"need --images >= --batch and --val >= 1, got {args.images}, {args.val}")
    return args


def main() -> None:
    args = parse_args()
    if args.table:
        print_table(json.loads(Path(args.table).read_text()))
        return
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args, args.plain_first)), flush=True)
        return
    results = []
    for i, backbone in enumerate(args.backbones.split(",")):
        results.append(run_child(backbone, args, plain_first=i % 2 == 1))
        print(json.dumps(results[-1]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: list[dict]) -> None:
    print("\n" + HEADER)
    for r in results:
        print(row(r))


if __name__ == "__main__":
    main()
