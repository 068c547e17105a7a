"""Fitting a classifier the way the paper does (SGD + momentum, best-validation weights kept),
with the frozen half computed once when nothing changes from epoch to epoch.

With augmentation off, the frozen lower half of the network is a fixed function of its input
(frozen BatchNorm runs in inference mode), so its output is computed once and only the
trainable top is run each epoch. The trained layers are shared with the full model, which is
what callers save, evaluate and log.

The features are held in memory up to ``FitConfig.frozen_memory_bytes``; past it (the paper's
Transition set at 224 px: 3.8 to 7.6 GiB per backbone) they are written batch by batch to a
memory-mapped ``.npy`` (in the array cache, or a temporary file deleted as soon as it is mapped)
and each batch is gathered from the map, so the cache stays on at the paper's scale without the
RAM (docs/benchmarks.md).
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf

from mstl import defaults
from mstl.array_cache import ArrayCache, content_key, outcome, require_free_space
from mstl.data.pipeline import augment_policy, image_dataset
from mstl.inference.predict import compiled_forward
from mstl.models.classifier import OutputSpec, cache_cut_index, split_at_cut


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and TensorFlow; with ``deterministic`` (the default) also make TF ops
    deterministic, so a run repeats exactly. On a GPU that is slower, and an op without a
    deterministic kernel raises; ``deterministic=false`` keeps the seeds and lets such ops run (runs
    then vary slightly)."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def set_threads(threads: int) -> None:
    """Let TensorFlow use ``threads`` threads within an op and between ops (0: its default, one per
    core). Two grid workers with one thread each get more from a 2-core machine than one worker with
    two (docs/benchmarks.md). Must run before TensorFlow's first op."""
    if threads < 0:
        raise ValueError(f"threads must be 0 (TensorFlow's default) or more, got {threads}")
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


@dataclass(frozen=True)
class FitSettings:
    """How a network is fitted: the user-facing part, shared with every training stage's
    parameters."""

    epochs: int = defaults.EPOCHS
    batch_size: int = defaults.BATCH_SIZE
    learning_rate: float = defaults.LEARNING_RATE
    momentum: float = defaults.MOMENTUM
    seed: int = defaults.SEED
    # false/true (none/mild); the Target stage's is a policy of mstl.data.pipeline.AUGMENTATIONS
    augment: bool = False
    cache_frozen: bool = True
    deterministic: bool = True
    # stop after this many epochs without a better validation accuracy (0: never, as in the paper's
    # Target); the best epoch's weights are kept either way, so stopping only skips epochs that
    # could not be kept unless a later one beat them (docs/choices.md)
    patience: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.patience < 0:
            raise ValueError(
                f"patience must be 0 (never stop early) or a number of epochs, got {self.patience}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")


@dataclass(frozen=True)
class FitConfig(FitSettings):
    class_weight: dict[int, float] | None = None
    log_to_mlflow: bool = True
    # frozen features larger than this live in a memory-mapped file on disk instead of in RAM
    frozen_memory_bytes: int = defaults.FROZEN_CACHE_MAX_BYTES
    # stop each epoch after this many batches (0: the whole training set): for benchmarks that
    # need the paper's array sizes but not its hours of training
    steps_per_epoch: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("frozen_memory_bytes", "steps_per_epoch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")


DISTRIBUTE = ("none", "mirrored")


@contextmanager
def distribution_scope(name: str):
    """``none``: as is. ``mirrored``: tf.distribute.MirroredStrategy over every visible GPU (or,
    with none, every logical CPU device); the model must be built and compiled inside this scope."""
    if name not in DISTRIBUTE:
        raise ValueError(f"distribute must be one of {DISTRIBUTE}, got {name!r}")
    if name == "none":
        yield None
        return
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
    print(
        f"distribute=mirrored: {strategy.num_replicas_in_sync} replica(s) on "
        f"{[d.name for d in devices]}"
    )
    with strategy.scope():
        yield strategy


def keep_best_weights(patience: int, epochs: int) -> keras.callbacks.EarlyStopping:
    """Keras's own keep-best rule: the weights at the best validation accuracy (ties: the earliest
    epoch) are restored when the fit ends. ``patience`` 0 means never stop early (Keras would stop
    at the first epoch without a better one), so it becomes more epochs than the fit has."""
    return keras.callbacks.EarlyStopping(
        monitor="val_accuracy",
        mode="max",
        patience=patience or epochs,
        restore_best_weights=True,
    )


class EpochTimer(keras.callbacks.Callback):
    """Wall time of each epoch (the first one includes computing the frozen features' graph
    warm-up)."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


class MlflowEpochLogger(keras.callbacks.Callback):
    """Log train/val loss and accuracy per epoch, plus the epoch's wall time.

    Names are ``epoch_train_*`` / ``epoch_val_*``, so that ``val_*`` and ``test_*`` stay free for
    the evaluation of the kept (best) model.
    """

    def __init__(self, timer: EpochTimer):
        super().__init__()
        self.timer = timer

    def on_epoch_end(self, epoch, logs=None):
        values = {
            "epoch_" + (k if k.startswith("val_") else "train_" + k): float(v)
            for k, v in (logs or {}).items()
            if np.isscalar(v) and k != "learning_rate"
        }
        values["epoch_seconds"] = self.timer.seconds[-1]
        mlflow.log_metrics(values, step=epoch)


@dataclass
class FitResult:
    best_epoch: int
    best_val_accuracy: float
    history: dict[str, list[float]]
    cached_frozen: bool
    cut_layer: str | None
    seconds: float  # everything, frozen features included
    epoch_seconds: list[float]
    frozen_cache: str = "off"  # the on-disk cache of frozen features: off, hit (every part) or miss
    frozen_seconds: float = 0.0  # computing (or reading) the frozen half's features
    frozen_storage: str = "none"  # where the frozen features lived: none, memory or disk

    @property
    def epochs_run(self) -> int:
        """Fewer than the configured epochs when ``patience`` stopped the fit early."""
        return len(self.epoch_seconds)

    def metrics(self) -> dict[str, float]:
        """What a run logs about its fit (``best_epoch`` counts from 0, as the epoch metrics' steps
        do)."""
        return {
            "best_epoch": self.best_epoch,
            "best_val_accuracy": self.best_val_accuracy,
            "epochs_run": self.epochs_run,
            "fit_seconds": self.seconds,
            "frozen_seconds": self.frozen_seconds,
        }

    def params(self, cache: ArrayCache | None = None) -> dict[str, object]:
        """What a run logs about how its fit was computed."""
        return {
            "cached_frozen": self.cached_frozen,
            "cache_cut_layer": self.cut_layer,
            "frozen_cache": self.frozen_cache,
            "frozen_storage": self.frozen_storage,
            "decoded_cache": outcome(cache, "decoded"),
        }


def frozen_key(bottom: keras.Model, preprocess_input, grey: np.ndarray, batch_size: int) -> str:
    """What the frozen half's output depends on: its layers and weights, the backbone's input
    preprocessing, the slices' pixels (which carry the preprocessing before them) and the batch size
    (kernels may round differently per batch shape), and the Keras version."""
    return content_key(
        [
            "frozen",
            keras.__version__,
            f"{preprocess_input.__module__}.{preprocess_input.__qualname__}",
            str(batch_size),
            ",".join(type(layer).__name__ for layer in bottom.layers),
            *(np.asarray(w) for w in bottom.get_weights()),
            grey,
        ]
    )


def frozen_cut(model: keras.Model, config: FitConfig) -> int | None:
    """The layer up to which the network is computed once, or None: with augmentation nothing is
    fixed. Any size is cached: features past ``frozen_memory_bytes`` go to disk."""
    if not config.cache_frozen or augment_policy(config.augment) != "none":
        return None
    return cache_cut_index(model)


@dataclass
class FrozenFeatures:
    """The frozen half's output for the training and validation slices, and how it was had."""

    train: np.ndarray  # in memory, or a read-only memory map of a .npy file
    val: np.ndarray
    cache: str  # off, hit or miss
    seconds: float
    storage: str = "none"  # none (no frozen cut), memory or disk


def fill_features(
    bottom: keras.Model, grey: np.ndarray, preprocess_input, batch_size: int, out: np.ndarray
) -> np.ndarray:
    """Write the frozen half's output for ``grey`` into ``out`` (in memory or a memory map) batch
    by batch: the compiled forward pass and batches of ``predict_grey``, so the same numbers,
    without a list of batches and their concatenation (twice the features) in memory."""
    forward = compiled_forward(bottom)
    start = 0
    for x in image_dataset(grey, None, preprocess_input, batch_size):
        batch = forward(tf.cast(x, tf.float32)).numpy()
        out[start : start + len(batch)] = batch
        start += len(batch)
    return out


def part_features(
    bottom: keras.Model,
    part: tuple[str, np.ndarray],
    preprocess_input,
    config: FitConfig,
    cache: ArrayCache | None,
    scratch: Path | None,
) -> np.ndarray:
    """One part's features: in memory, or (with ``scratch``, the folder for arrays past the memory
    budget) memory-mapped from the cache's entry or from a file in ``scratch``."""
    name, grey = part
    shape = (len(grey), *bottom.output.shape[1:])

    def fill(out: np.ndarray) -> np.ndarray:
        return fill_features(bottom, grey, preprocess_input, config.batch_size, out)

    if cache is None and scratch is None:
        return fill(np.empty(shape, np.float32))
    if cache is None:
        with tempfile.NamedTemporaryFile(dir=scratch, prefix=f"mstl-frozen-{name}-") as file:
            out = np.lib.format.open_memmap(file.name, "w+", np.float32, shape)
        # the file is deleted at once; the map keeps its pages until dropped, so not even a killed
        # run leaves it behind
        return fill(out)
    key = frozen_key(bottom, preprocess_input, grey, config.batch_size)
    if scratch is None:
        return cache.get("frozen", key, lambda: fill(np.empty(shape, np.float32)))
    return cache.get_mapped("frozen", key, shape, fill)


def frozen_features(
    bottom: keras.Model,
    grey: tuple[np.ndarray, np.ndarray],
    preprocess_input,
    config: FitConfig,
    cache: ArrayCache | None,
) -> FrozenFeatures:
    """The frozen half over the training and validation slices, from the on-disk cache when it has
    them (keyed by everything the output depends on). Past ``config.frozen_memory_bytes`` they
    are memory-mapped files: the cache's entries, or deleted temporary files (under TMPDIR; on a
    RAM-backed tmpfs point TMPDIR at a disk)."""
    needed = 4 * int(np.prod(bottom.output.shape[1:])) * (len(grey[0]) + len(grey[1]))
    scratch = None
    if needed > config.frozen_memory_bytes:
        scratch = cache.folder if cache is not None else Path(tempfile.gettempdir())
        print(
            f"frozen features: {needed / 1024**3:.2f} GiB, over the memory budget of "
            f"{config.frozen_memory_bytes / 1024**3:.2f} GiB; memory-mapped from {scratch}"
        )
        if cache is None:
            require_free_space(scratch, needed, "the frozen features")
    misses = dict(cache.misses) if cache is not None else {}
    start = time.perf_counter()
    train, val = (
        part_features(bottom, part, preprocess_input, config, cache, scratch)
        for part in (("train", grey[0]), ("val", grey[1]))
    )
    how = "off"
    if cache is not None:
        missed = cache.misses.get("frozen", 0) > misses.get("frozen", 0)
        how = "miss" if missed else "hit"
    storage = "memory" if scratch is None else "disk"
    return FrozenFeatures(train, val, how, time.perf_counter() - start, storage)


def gathered_batches(
    features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int | None = None
) -> tf.data.Dataset:
    """Batches of ``(features[i], labels[i])`` for index batches ``i``: shuffled (seeded, anew each
    epoch) over all rows when ``seed`` is given, else in order. The rows are gathered from the
    array per batch, so the dataset holds no copy of it, in memory or memory-mapped alike; the
    index shuffle draws the same order as shuffling the rows themselves did
    (tests/unit/test_frozen_memmap.py)."""
    index = tf.data.Dataset.range(len(features))
    if seed is not None:
        index = index.shuffle(len(features), seed=seed, reshuffle_each_iteration=True)
    x_shape, y_shape = (None, *features.shape[1:]), (None, *labels.shape[1:])

    def take(i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(features[i]), labels[i]

    def gather(i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = tf.numpy_function(take, [i], (tf.float32, tf.as_dtype(labels.dtype)), stateful=False)
        return tf.ensure_shape(x, x_shape), tf.ensure_shape(y, y_shape)

    return index.batch(batch_size).map(gather).prefetch(tf.data.AUTOTUNE)


def feature_datasets(
    frozen: FrozenFeatures, y: tuple[np.ndarray, np.ndarray], config: FitConfig
) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    """Batches of the frozen features: shuffled (seeded) for training, in order for validation."""
    train = gathered_batches(frozen.train, y[0], config.batch_size, config.seed)
    return train, gathered_batches(frozen.val, y[1], config.batch_size)


def fit_classifier(
    model: keras.Model,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    preprocess_input,
    output: OutputSpec,
    config: FitConfig,
    cache: ArrayCache | None = None,
) -> FitResult:
    """Train ``model`` on decoded grey slices; the best-val-accuracy weights are left in ``model``.
    With ``cache``, the frozen half's features are read from (or written to) that shared on-disk
    cache."""
    if len(train[0]) == 0 or len(val[0]) == 0:
        raise ValueError(
            f"need training and validation images, got {len(train[0])} and {len(val[0])}"
        )
    start = time.perf_counter()
    cut = frozen_cut(model, config)
    frozen = FrozenFeatures(train[0][:0], val[0][:0], "off", 0.0)
    if cut is not None:
        bottom, trained = split_at_cut(model, cut)
        frozen = frozen_features(bottom, (train[0], val[0]), preprocess_input, config, cache)
        train_ds, val_ds = feature_datasets(frozen, (train[1], val[1]), config)
    else:
        trained = model
        train_ds = image_dataset(
            *train, preprocess_input, config.batch_size, True, config.seed, config.augment
        )
        val_ds = image_dataset(*val, preprocess_input, config.batch_size)
    keep, timer, history = train_top(trained, train_ds, val_ds, output, config)
    return FitResult(
        best_epoch=keep.best_epoch,
        best_val_accuracy=float(keep.best),
        history={k: [float(v) for v in vs] for k, vs in history.history.items()},
        cached_frozen=cut is not None,
        cut_layer=model.layers[cut].name if cut is not None else None,
        seconds=time.perf_counter() - start,
        epoch_seconds=timer.seconds,
        frozen_cache=frozen.cache,
        frozen_seconds=frozen.seconds,
        frozen_storage=frozen.storage,
    )


def train_top(
    trained: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    output: OutputSpec,
    config: FitConfig,
):
    """The paper's optimiser (SGD with momentum) on the part that trains, best weights kept; the
    keep-best callback, the epoch timer and Keras's history."""
    trained.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate=config.learning_rate, momentum=config.momentum
        ),
        loss=output.loss,
        metrics=["accuracy"],
    )
    keep, timer = keep_best_weights(config.patience, config.epochs), EpochTimer()
    callbacks: list[keras.callbacks.Callback] = [keep, timer]
    if config.log_to_mlflow:
        callbacks.append(MlflowEpochLogger(timer))
    history = trained.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.epochs,
        callbacks=callbacks,
        class_weight=config.class_weight,
        shuffle=False,  # the datasets shuffle themselves, seeded
        steps_per_epoch=config.steps_per_epoch or None,
        verbose=2,
    )
    return keep, timer, history
