"""What a grid will cost, measured on this device before it runs: images per second of each
backbone's parts, and from them seconds and peak memory per cell, stage and worker.

The probe builds each network with random weights (the arithmetic, and so the time, does not depend
on the weights' values), runs one warm-up batch of each part, then times a few batches: the frozen
half's forward pass (computed once per fit), a training step of the trained half on cached features
and its forward pass (each epoch's validation), a full-network training step (what runs when the
frozen features are not cached: augmentation), the full network's prediction, and the conv base
alone (soft-label features). It runs in a process of its own, as every grid cell does: it pays and
reports a cell's start-up, its memory is a fresh process's, and a GPU it touches is released for the
cells when it ends.

    python -m mstl.training.cost '{"entries": [["mobilenet_025", 64, false]], "batch_size": 8}' \
        out.json
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import psutil
import tensorflow as tf

from mstl import PACKAGE_DIR, defaults
from mstl.data.pipeline import grey_to_input
from mstl.inference.predict import compiled_forward
from mstl.models import (
    TARGET_OUTPUT,
    build_classifier,
    cache_cut_index,
    get_backbone,
    split_at_cut,
)
from mstl.models.classifier import HEAD_PREFIX
from mstl.training.fit import set_threads

# prepare_transition is not probed (no network): real Lung-PET-CT-Dx DICOM, 114 slices/s on the
# 2-core CPU of docs/benchmarks.md (bench_prepare.py)
PREPARE_SLICES_PER_SECOND = 114.0
# the paper's Transition set after its selection: SPIE-AAPM, 10,176 slices
PAPER_TRANSITION_SLICES = 10_176
STAGE_ORDER = ("prepare_transition", "soft_labels", "transition", "target", "evaluate")
GB = 1e9


@dataclass(frozen=True)
class BackboneCost:
    """One backbone at one image size on this device: images/s of each part (NaN: not measured,
    e.g. no frozen cut, or only the conv base was asked for), sizes, and the probe process's RSS
    right after this backbone's probe."""

    backbone: str
    image_size: int
    batch_size: int
    build_seconds: float
    base_forward: float  # the conv base alone: soft-label features
    predict: float = math.nan  # the whole network, inference mode
    full_step: float = math.nan  # a training step through the whole network
    frozen_forward: float = math.nan  # the frozen half, once per fit
    top_step: float = math.nan  # a training step of the trained half on cached features
    top_forward: float = math.nan  # the trained half on cached features: validation each epoch
    params: int = 0
    trainable_params: int = 0
    frozen_values: int = 0  # float32 values per image at the frozen cut (0: no cut)
    feature_values: int = 0  # float32 values per image out of the conv base
    rss_bytes: int = 0


@dataclass(frozen=True)
class Measurements:
    """The probe's result: per ``backbone@size``, the start-up of a process that imports the
    training code (each cell pays it) and that process's RSS before any network existed."""

    backbones: dict[str, BackboneCost]
    startup_seconds: float
    base_rss_bytes: int
    probe_seconds: float = 0.0
    device: str = ""
    load_average: float = 0.0  # the 1-minute load while probing: a shared machine's times scale
    # the soft-label search (KMeans over every k and fold), seconds per slice; measured by the stage
    kmeans_seconds_per_slice: float = 0.0

    def get(self, backbone: str, image_size: int) -> BackboneCost:
        key = entry_key(backbone, image_size)
        if key not in self.backbones:
            raise KeyError(f"no measurement of {key}; measured: {', '.join(self.backbones)}")
        return self.backbones[key]


def entry_key(backbone: str, image_size: int) -> str:
    return f"{backbone}@{image_size}"


def images_per_second(step: Callable[[], object], batch_size: int, batches: int) -> float:
    """Images/s of ``step`` (one batch, its result fetched) over ``batches`` timed calls after one
    warm-up call (tracing and compiling, which the real runs pay once)."""
    step()
    start = time.perf_counter()
    for _ in range(batches):
        step()
    return batches * batch_size / (time.perf_counter() - start)


def conv_base(model: keras.Model) -> keras.Model:
    """The network without its ``head_*`` layers: what soft-label features are taken from."""
    last = max(i for i, layer in enumerate(model.layers) if not layer.name.startswith(HEAD_PREFIX))
    return keras.Model(model.input, model.layers[last].output)


def sgd(model: keras.Model) -> None:
    """The fit's optimiser and loss, as ``train_top`` compiles them."""
    model.compile(
        optimizer=keras.optimizers.SGD(defaults.LEARNING_RATE, momentum=defaults.MOMENTUM),
        loss=TARGET_OUTPUT.loss,
    )


def measure_backbone(
    backbone: str, image_size: int, batch_size: int, batches: int = 2, features_only: bool = False
) -> BackboneCost:
    """Time every part of one backbone's network (random weights, random pixels) on this device."""
    start = time.perf_counter()
    model = build_classifier(backbone, None, image_size, TARGET_OUTPUT)
    build_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (batch_size, image_size, image_size), dtype=np.uint8)
    x = grey_to_input(tf.constant(grey), get_backbone(backbone).preprocess_input)
    y = np.zeros((batch_size, 1), np.float32)

    def rate(step: Callable[[], object]) -> float:
        return images_per_second(step, batch_size, batches)

    base = conv_base(model)
    cut = cache_cut_index(model)
    if features_only:
        parts = {"base_forward": rate(lambda: compiled_forward(base)(x).numpy())}
    else:
        # the head (pooling, one dense layer) is a rounding error next to the conv base: one
        # traced forward pass serves both
        parts = {"predict": rate(lambda: compiled_forward(model)(x).numpy())}
        parts["base_forward"] = parts["predict"]
        if cut is not None:
            bottom, top = split_at_cut(model, cut)
            features = compiled_forward(bottom)(x).numpy()
            parts["frozen_forward"] = rate(lambda: compiled_forward(bottom)(x).numpy())
            parts["top_forward"] = rate(lambda: compiled_forward(top)(features).numpy())
            sgd(top)
            parts["top_step"] = rate(lambda: top.train_on_batch(features, y))
        sgd(model)
        parts["full_step"] = rate(lambda: model.train_on_batch(x, y))
    cost = BackboneCost(
        backbone,
        image_size,
        batch_size,
        build_seconds,
        params=model.count_params(),
        trainable_params=int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        frozen_values=int(np.prod(model.layers[cut].output.shape[1:])) if cut is not None else 0,
        feature_values=int(np.prod(base.output.shape[1:])),
        rss_bytes=psutil.Process().memory_info().rss,
        **parts,
    )
    return cost


def device_name() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    return f"{len(gpus)} GPU(s)" if gpus else f"CPU, {os.cpu_count()} cores"


def probe(spec: dict) -> Measurements:
    """Run in the probe process: ``spec`` has ``entries`` ([backbone, image_size, features_only]),
    ``batch_size``, ``batches`` and ``threads``."""
    startup = time.time() - psutil.Process().create_time()
    set_threads(int(spec.get("threads", 0)))
    base_rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    costs = {}
    for backbone, size, features_only in spec["entries"]:
        costs[entry_key(backbone, size)] = measure_backbone(
            backbone, size, spec["batch_size"], spec.get("batches", 2), features_only
        )
        keras.backend.clear_session()  # the next network starts from what this one freed
        gc.collect()
    return Measurements(
        costs, startup, base_rss, time.perf_counter() - start, device_name(), os.getloadavg()[0]
    )


def measurements_from_json(text: str) -> Measurements:
    raw = json.loads(text)
    raw["backbones"] = {k: BackboneCost(**v) for k, v in raw["backbones"].items()}
    return Measurements(**raw)


def measure(
    entries: list[tuple[str, int, bool]], batch_size: int, batches: int = 2, threads: int = 0
) -> Measurements:
    """Probe ``entries`` ((backbone, image_size, features_only)) in a fresh process, as a cell
    would run; raises naming the probe when it fails."""
    spec = {"entries": entries, "batch_size": batch_size, "batches": batches, "threads": threads}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PACKAGE_DIR.parent), *filter(None, [env.get("PYTHONPATH")])]
    )
    with tempfile.TemporaryDirectory(prefix="mstl-cost-") as tmp:
        out = Path(tmp) / "measurements.json"
        command = [sys.executable, "-m", "mstl.training.cost", json.dumps(spec), str(out)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode or not out.is_file():
            raise RuntimeError(
                f"the cost probe ({' '.join(command[1:4])}) failed with exit code "
                f"{done.returncode}:\n{done.stderr[-3000:]}"
            )
        return measurements_from_json(out.read_text())


@dataclass(frozen=True)
class CellWork:
    """What one cell processes: its stage, network and image counts (``n_train``/``n_val``/
    ``n_test`` for fits, ``n_slices`` for prepare_transition and soft_labels)."""

    stage: str
    backbone: str = ""
    image_size: int = 0
    epochs: int = 0
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    n_slices: int = 0


@dataclass(frozen=True)
class CellCost:
    images: int
    seconds: float
    peak_bytes: float
    cached: bool = False


def fit_cost(w: CellWork, b: BackboneCost, m: Measurements) -> CellCost:
    """A Transition or Target cell: frozen pass once and the trained half each epoch (as
    ``frozen_cut`` decides: any backbone with a cut), else the whole network every step; a Target
    adds val and test predictions, the masked-lung probe (test again) and Grad-CAM on test (a
    forward and backward pass, priced as a training step)."""
    n_fit = w.n_train + w.n_val
    feature_bytes = 4 * b.frozen_values * n_fit
    cached = b.frozen_values > 0
    # features past the budget are memory-mapped: page cache, not the process's own memory
    in_memory = cached and feature_bytes <= defaults.FROZEN_CACHE_MAX_BYTES
    images = w.epochs * n_fit
    if cached:
        images += n_fit
        seconds = n_fit / b.frozen_forward + w.epochs * (
            w.n_train / b.top_step + w.n_val / b.top_forward
        )
    else:
        seconds = w.epochs * (w.n_train / b.full_step + w.n_val / b.predict)
    if w.n_test:
        images += w.n_val + 3 * w.n_test
        seconds += (w.n_val + 2 * w.n_test) / b.predict + w.n_test / b.full_step
    decoded = (n_fit + w.n_test) * w.image_size**2  # uint8 grey slices
    peak = b.rss_bytes + decoded + (feature_bytes if in_memory else 0)
    return CellCost(images, seconds + m.startup_seconds + b.build_seconds, peak, cached)


def cell_cost(w: CellWork, m: Measurements) -> CellCost:
    """Seconds, images and peak RSS of one cell on the measured device."""
    if w.stage == "prepare_transition":
        seconds = m.startup_seconds + w.n_slices / PREPARE_SLICES_PER_SECOND
        return CellCost(w.n_slices, seconds, m.base_rss_bytes)
    b = m.get(w.backbone, w.image_size)
    if w.stage == "soft_labels":
        seconds = w.n_slices * (1 / b.base_forward + m.kmeans_seconds_per_slice)
        # the features and one training fold's copy of them (docs/benchmarks.md)
        peak = b.rss_bytes + 2 * 4 * b.feature_values * w.n_slices
        return CellCost(w.n_slices, seconds + m.startup_seconds + b.build_seconds, peak)
    if w.stage in ("transition", "target"):
        return fit_cost(w, b, m)
    if w.stage == "evaluate":
        # the set's predictions, the shortcut probes' (masked, cropped: two more passes) and
        # Grad-CAM on the errors (at most every image, priced as a training step)
        seconds = 3 * w.n_slices / b.predict + w.n_slices / b.full_step
        peak = b.rss_bytes + w.n_slices * w.image_size**2
        return CellCost(4 * w.n_slices, seconds + m.startup_seconds + b.build_seconds, peak)
    raise ValueError(f"unknown stage {w.stage!r}; use one of {', '.join(STAGE_ORDER)}")


@dataclass
class PlanCost:
    """The plan per stage and its totals."""

    table: pd.DataFrame
    hours: float
    hours_workers: float
    workers: int
    peak_rss_gb: float
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {
            "estimated_hours": self.hours,
            "estimated_hours_workers": self.hours_workers,
            "estimated_peak_rss_gb": self.peak_rss_gb,
        }

    def text(self) -> str:
        """The table and totals as printed before a grid runs."""
        lines = [
            self.table.to_string(index=False, float_format=lambda v: f"{v:,.1f}"),
            f"estimated: {self.hours:.2f} h for one worker, {self.hours_workers:.2f} h for "
            f"{self.workers} worker(s); peak memory per worker {self.peak_rss_gb:.2f} GB",
        ]
        return "\n".join(lines + [f"- {note}" for note in self.notes])


def plan_cost(
    work: list[CellWork], m: Measurements, workers: int = 1, notes: list[str] | None = None
) -> PlanCost:
    """Per stage: cells, images to process, estimated seconds (all cells and per cell) and peak
    RSS; with ``workers``, the wall time if they split the cells evenly, never less than the
    longest chain prepare -> soft_labels -> transition -> target (one cell of each)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    rows = [{"stage": w.stage, **asdict(cell_cost(w, m))} for w in work]
    cells = pd.DataFrame(rows, columns=["stage", "images", "seconds", "peak_bytes", "cached"])
    by_stage = cells.groupby("stage", sort=False).agg(
        cells=("seconds", "size"),
        images=("images", "sum"),
        seconds=("seconds", "sum"),
        seconds_per_cell=("seconds", "mean"),
        longest=("seconds", "max"),
        peak_rss_gb=("peak_bytes", "max"),
    )
    by_stage = by_stage.reindex([s for s in STAGE_ORDER if s in by_stage.index])
    # a worker is a process too (TensorFlow imported, as the probe's before any network)
    by_stage["peak_rss_gb"] = (by_stage["peak_rss_gb"] + m.base_rss_bytes) / GB
    total = float(by_stage["seconds"].sum())
    chain = float(by_stage.pop("longest").sum())
    table = by_stage.reset_index()
    table.loc[len(table)] = [
        "total",
        int(by_stage["cells"].sum()),
        int(by_stage["images"].sum()),
        total,
        math.nan,
        float(by_stage["peak_rss_gb"].max()),
    ]
    return PlanCost(
        table,
        total / 3600,
        max(total / workers, chain) / 3600,
        workers,
        float(by_stage["peak_rss_gb"].max()) if len(by_stage) else 0.0,
        list(notes or []),
    )


if __name__ == "__main__":
    measured = probe(json.loads(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(asdict(measured)))
