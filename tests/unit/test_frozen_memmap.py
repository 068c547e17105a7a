"""Frozen features past the memory budget: written batch by batch to a memory-mapped .npy (the array
cache's entry, or a temporary folder) and trained from the map, with the same result as in memory.
A toy network with four conv layers keeps these fast; the paper's backbones are measured in
benchmarks/bench_memory.py."""

import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from mstl.array_cache import ArrayCache, DiskSpaceError
from mstl.inference.predict import predict_grey
from mstl.models import TARGET_OUTPUT
from mstl.models.classifier import cache_cut_index, freeze_shallow_half, split_at_cut
from mstl.training.fit import (
    FitConfig,
    fill_features,
    fit_classifier,
    gathered_batches,
    set_seed,
)


def preprocess(x):
    return x / 127.5 - 1.0


def toy_model() -> keras.Model:
    """Four conv layers, the first two frozen (so the frozen half has a cut), a sigmoid head."""
    inputs = keras.Input((16, 16, 3))
    x = inputs
    for i in range(4):
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name=f"conv{i}")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    freeze_shallow_half(model)
    return model


def toy_data(n=40):
    rng = np.random.default_rng(0)
    y = (np.arange(n) % 2).astype("float32")
    grey = rng.integers(0, 120, (n, 16, 16)).astype(np.uint8)
    grey[y == 1, 4:8, 4:8] = 230
    return grey, y


def fit(cache=None, budget=2**30, epochs=2):
    """Same seed, same data: only where the frozen features live changes."""
    set_seed(0)
    model = toy_model()
    grey, y = toy_data()
    config = FitConfig(
        epochs=epochs,
        batch_size=8,
        learning_rate=0.1,
        log_to_mlflow=False,
        frozen_memory_bytes=budget,
        seed=1,
    )
    result = fit_classifier(
        model, (grey[:30], y[:30]), (grey[30:], y[30:]), preprocess, TARGET_OUTPUT, config, cache
    )
    return model.get_weights(), result


def test_memory_mapped_features_train_the_same_weights_and_history_as_features_in_memory(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # TMPDIR for this test
    (tmp_path / "tmp").mkdir()
    memory_weights, memory = fit()
    disk_weights, disk = fit(budget=0)
    cached_weights, cached = fit(cache=ArrayCache(tmp_path / "cache"), budget=0)
    assert (memory.frozen_storage, disk.frozen_storage, cached.frozen_storage) == (
        "memory",
        "disk",
        "disk",
    )
    assert memory.cached_frozen and disk.cached_frozen and cached.frozen_cache == "miss"
    for weights in (disk_weights, cached_weights):
        for a, b in zip(memory_weights, weights, strict=True):
            np.testing.assert_array_equal(a, b)
    assert disk.history == memory.history == cached.history
    assert memory.history["loss"][1] != memory.history["loss"][0]  # it trained
    assert not list((tmp_path / "tmp").glob("mstl-frozen-*"))  # the temporary folder is gone
    assert memory.params()["frozen_storage"] == "memory"


def test_a_damaged_memory_mapped_entry_is_recomputed_not_trusted(tmp_path, capsys):
    _, first = fit(cache=ArrayCache(tmp_path), budget=0, epochs=1)
    entries = sorted((tmp_path / "frozen").glob("*.npy"), key=lambda p: p.stat().st_size)
    assert first.frozen_cache == "miss" and len(entries) == 2  # val, train
    reference = np.load(entries[1])
    entries[1].write_bytes(entries[1].read_bytes()[:-64])  # truncated: a full disk, a killed copy
    again = ArrayCache(tmp_path)
    _, second = fit(cache=again, budget=0, epochs=1)
    assert again.rejected == [str(entries[1])] and "is damaged" in capsys.readouterr().out
    assert again.misses == {"frozen": 1} and again.hits == {"frozen": 1}
    assert second.frozen_cache == "miss"
    np.testing.assert_array_equal(ArrayCache(tmp_path).load("frozen", entries[1].stem), reference)


def test_batches_written_into_an_array_equal_the_batched_prediction():
    model = toy_model()
    bottom, _ = split_at_cut(model, cache_cut_index(model))
    grey, _ = toy_data(13)
    out = np.full((13, *bottom.output.shape[1:]), np.nan, np.float32)
    fill_features(bottom, grey, preprocess, 4, out)  # batches of 4, 4, 4 and 1
    np.testing.assert_array_equal(out, predict_grey(bottom, grey, preprocess, 4))


def test_the_index_shuffle_visits_rows_in_the_order_the_row_shuffle_did():
    """Today's order (a shuffle of the rows themselves, seeded, anew each epoch) is kept: the same
    seed draws the same permutation whatever the elements are."""
    n, seed = 37, 3
    rows = np.arange(n, dtype=np.float32)[:, None]
    labels = np.arange(n, dtype=np.int64)
    keras.utils.set_random_seed(0)
    old = tf.data.Dataset.from_tensor_slices((rows, labels)).cache()
    old = old.shuffle(n, seed=seed, reshuffle_each_iteration=True).batch(8)
    old_epochs = [np.concatenate([y.numpy() for _, y in old]) for _ in range(3)]
    keras.utils.set_random_seed(0)
    new = gathered_batches(rows, labels, 8, seed)
    new_epochs = [np.concatenate([y.numpy() for _, y in new]) for _ in range(3)]
    for a, b in zip(old_epochs, new_epochs, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(new_epochs[0], new_epochs[1])  # reshuffled each epoch
    x, y = next(iter(gathered_batches(rows, labels, 8)))  # validation: in order
    np.testing.assert_array_equal(x.numpy()[:, 0], y.numpy())
    assert y.numpy().tolist() == list(range(8))


def test_features_that_need_more_disk_than_is_free_are_refused_before_anything_is_written(
    tmp_path,
):
    cache = ArrayCache(tmp_path)
    huge = (2**20, 2**20)  # 4 TiB of float32
    with pytest.raises(DiskSpaceError, match=f"4398046515200 bytes .* in {tmp_path}"):
        cache.get_mapped("frozen", "k", huge, lambda out: None)
    assert not list((tmp_path / "frozen").iterdir())
