"""Fitting: repeatable with a seed, best-validation weights kept, frozen features used when
allowed."""

import keras
import numpy as np
import pytest

from mstl.data.pipeline import image_dataset
from mstl.inference.predict import predict_in_batches
from mstl.models import TARGET_OUTPUT, build_classifier, get_backbone
from mstl.training.fit import FitConfig, fit_classifier, set_seed

pytestmark = pytest.mark.integration  # trains a network

SPEC = get_backbone("mobilenet_025")


def tiny_data(n=48, size=32, seed=0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype("float32")
    grey = rng.integers(0, 120, (n, size, size)).astype(np.uint8)
    grey[y == 1, size // 4 : size // 2, size // 4 : size // 2] = 230  # a learnable bright patch
    return grey, y


def fit_once(seed=0, cache=None, grey=None, weight_seed=None, **config):
    set_seed(seed if weight_seed is None else weight_seed)
    model = build_classifier("mobilenet_025", weights=None, image_size=32)
    set_seed(seed)
    data, y = tiny_data()
    grey = data if grey is None else grey
    cfg = FitConfig(
        epochs=config.pop("epochs", 2), batch_size=16, seed=seed, log_to_mlflow=False, **config
    )
    result = fit_classifier(
        model,
        (grey[:32], y[:32]),
        (grey[32:], y[32:]),
        SPEC.preprocess_input,
        TARGET_OUTPUT,
        cfg,
        cache,
    )
    return model, result


def test_same_seed_gives_identical_weights():
    a, _ = fit_once(seed=3)
    wa = [w.copy() for w in a.get_weights()]
    keras.backend.clear_session()
    b, _ = fit_once(seed=3)
    for x, y in zip(wa, b.get_weights(), strict=False):
        np.testing.assert_array_equal(x, y)


def test_frozen_features_are_cached_without_augmentation_only():
    _, cached = fit_once(epochs=1)
    assert cached.cached_frozen and cached.cut_layer
    _, augmented = fit_once(epochs=1, augment=True)
    assert not augmented.cached_frozen
    _, plain = fit_once(epochs=1, cache_frozen=False)
    assert not plain.cached_frozen


def test_frozen_features_past_the_memory_budget_are_memory_mapped(capsys):
    _, result = fit_once(epochs=1, frozen_memory_bytes=1000)
    assert result.cached_frozen and result.frozen_storage == "disk"
    assert "memory-mapped from" in capsys.readouterr().out


def test_best_validation_weights_are_restored():
    model, result = fit_once(epochs=4)
    grey, y = tiny_data()
    prob = predict_in_batches(model, image_dataset(grey[32:], None, SPEC.preprocess_input, 16))[
        :, 0
    ]
    accuracy = float(np.mean((prob >= 0.5) == y[32:]))
    assert accuracy == pytest.approx(result.best_val_accuracy)
    assert result.history["val_accuracy"][result.best_epoch] == max(result.history["val_accuracy"])


def test_frozen_layers_do_not_change():
    set_seed(0)
    model = build_classifier("mobilenet_025", weights=None, image_size=32)
    before = model.get_layer("conv1").get_weights()[0].copy()
    grey, y = tiny_data()
    fit_classifier(
        model,
        (grey[:32], y[:32]),
        (grey[32:], y[32:]),
        SPEC.preprocess_input,
        TARGET_OUTPUT,
        FitConfig(epochs=1, batch_size=16, log_to_mlflow=False, cache_frozen=False),
    )
    np.testing.assert_array_equal(before, model.get_layer("conv1").get_weights()[0])


def test_stopping_early_keeps_the_same_best_weights_as_training_every_epoch():
    patience, epochs = 1, 8
    full, full_result = fit_once(seed=2, epochs=epochs)
    history = full_result.history["val_accuracy"]
    best, stop = (
        0,
        None,
    )  # the rule: stop once `patience` epochs have passed without a better accuracy
    for epoch, value in enumerate(history):
        best = epoch if value > history[best] else best
        if epoch - best >= patience:
            stop = epoch
            break
    assert (
        stop is not None and stop < epochs - 1
    )  # this seed's history does stop early, so the test tests it
    full_weights = [w.copy() for w in full.get_weights()]
    keras.backend.clear_session()
    early, early_result = fit_once(seed=2, epochs=epochs, patience=patience)
    assert early_result.epochs_run == stop + 1 == len(early_result.history["val_accuracy"])
    assert early_result.history["val_accuracy"] == history[: stop + 1]  # the same epochs, cut short
    assert early_result.best_epoch == best
    if (
        full_result.best_epoch <= stop
    ):  # no later epoch beat it: the kept weights are the same, bit for bit
        for x, y in zip(full_weights, early.get_weights(), strict=True):
            np.testing.assert_array_equal(x, y)


def test_the_shared_frozen_cache_gives_the_same_weights_and_predictions_as_no_cache(tmp_path):
    from mstl.array_cache import ArrayCache

    plain, plain_result = fit_once(seed=1)
    reference = [w.copy() for w in plain.get_weights()]
    grey, _ = tiny_data()
    x = next(iter(image_dataset(grey, None, SPEC.preprocess_input, 48)))
    expected = np.asarray(plain(x, training=False))
    first_cache, second_cache = (
        ArrayCache(tmp_path),
        ArrayCache(tmp_path),
    )  # two runs (processes) sharing a folder
    runs = []
    for cache in (first_cache, second_cache):
        keras.backend.clear_session()
        model, result = fit_once(seed=1, cache=cache)
        runs.append(result.frozen_cache)
        for a, b in zip(reference, model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.asarray(model(x, training=False)), expected)
    assert plain_result.frozen_cache == "off" and runs == ["miss", "hit"]
    assert first_cache.misses == {"frozen": 2} and second_cache.hits == {
        "frozen": 2
    }  # train and val parts
    assert len(list((tmp_path / "frozen").glob("*.npy"))) == 2


def test_the_frozen_cache_misses_on_other_weights_or_images_and_recomputes_a_truncated_entry(
    tmp_path,
):
    from mstl.array_cache import ArrayCache

    fit_once(seed=1, cache=ArrayCache(tmp_path), epochs=1)
    other_weights = ArrayCache(tmp_path)
    fit_once(
        seed=1, weight_seed=2, cache=other_weights, epochs=1
    )  # another frozen half (random init, seed 2)
    assert other_weights.misses == {"frozen": 2} and not other_weights.hits
    grey, _ = tiny_data()
    grey[0, 0, 0] ^= 1  # one pixel of one training image
    other_images = ArrayCache(tmp_path)
    fit_once(seed=1, grey=grey, cache=other_images, epochs=1)
    assert other_images.misses == {"frozen": 1} and other_images.hits == {
        "frozen": 1
    }  # validation unchanged
    entry = max((tmp_path / "frozen").glob("*.npy"), key=lambda p: p.stat().st_mtime)
    entry.write_bytes(entry.read_bytes()[:-100])  # truncated (a disk full, a killed copy)
    again = ArrayCache(tmp_path)
    fit_once(seed=1, grey=grey, cache=again, epochs=1)
    assert again.rejected == [str(entry)] and again.misses == {"frozen": 1}
    assert ArrayCache(tmp_path).load("frozen", entry.stem) is not None  # rewritten whole
