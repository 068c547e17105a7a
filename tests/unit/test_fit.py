"""The fit's settings, its keep-best / stop-early rule, and the compiled batch predictions, without
training a network."""

import gc
import weakref

import keras
import numpy as np
import pytest

from mstl.data.pipeline import grey_to_input
from mstl.inference.predict import compiled_forward, predict_grey
from mstl.models import build_classifier, get_backbone
from mstl.training.fit import FitConfig, keep_best_weights


def stop_epoch(val_accuracies, patience):
    """Feed ``val_accuracies`` to the keep-best callback epoch by epoch; the epoch after which it
    stopped (or None)."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    keep = keep_best_weights(patience, epochs=len(val_accuracies))
    keep.set_model(model)
    keep.on_train_begin()
    model.stop_training = False
    for epoch, value in enumerate(val_accuracies):
        model.get_layer(index=0).kernel.assign(
            [[float(epoch)]]
        )  # weights that say which epoch they are from
        keep.on_epoch_end(epoch, {"val_accuracy": value})
        if model.stop_training:
            return epoch, keep
    return None, keep


def test_patience_stops_after_that_many_epochs_without_a_better_one_and_keeps_the_best():
    accuracies = [0.5, 0.6, 0.6, 0.55, 0.6, 0.7, 0.7]
    stopped, keep = stop_epoch(accuracies, patience=3)
    assert stopped == 4  # best at epoch 1; a tie (epoch 2, 4) is not better
    assert keep.best_epoch == 1 and keep.best == 0.6
    keep.on_train_end()
    assert (
        keep.model.get_layer(index=0).kernel.numpy()[0, 0] == 1.0
    )  # the best epoch's weights restored
    # a better epoch restarts the count
    assert stop_epoch([0.5, 0.5, 0.6, 0.6, 0.6], patience=2)[0] == 4
    assert stop_epoch([0.5, 0.5, 0.6, 0.6, 0.7], patience=3)[0] is None


def test_patience_zero_trains_every_epoch():
    stopped, keep = stop_epoch([0.9] + [0.1] * 30, patience=0)
    assert stopped is None and keep.best_epoch == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("learning_rate", -1.0),
        ("momentum", 1.0),
        ("patience", -1),
        ("frozen_memory_bytes", -1),
        ("steps_per_epoch", -1),
    ],
)
def test_impossible_fit_parameters_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        FitConfig(**{field: value})


def test_fit_metrics_count_the_epochs_run():
    from mstl.training.fit import FitResult

    result = FitResult(3, 0.8, {}, True, "cut", 10.0, [1.0] * 7, "hit", 0.5)
    assert result.metrics() == {
        "best_epoch": 3,
        "best_val_accuracy": 0.8,
        "epochs_run": 7,
        "fit_seconds": 10.0,
        "frozen_seconds": 0.5,
    }
    assert np.isfinite(list(result.metrics().values())).all()
    assert result.params()["frozen_storage"] == "none"  # where the frozen features lived


def test_batch_predictions_equal_eager_calls_bit_for_bit_with_one_trace():
    model = build_classifier("mobilenet_025", weights=None, image_size=32)
    preprocess = get_backbone("mobilenet_025").preprocess_input
    grey = np.random.default_rng(0).integers(0, 255, (11, 32, 32)).astype(np.uint8)
    eager = np.concatenate(
        [
            np.asarray(model(grey_to_input(grey[i : i + 4], preprocess), training=False))
            for i in range(0, len(grey), 4)
        ]
    )
    np.testing.assert_array_equal(
        predict_grey(model, grey, preprocess, 4), eager
    )  # batches of 4, 4 and 3
    np.testing.assert_array_equal(predict_grey(model, grey, preprocess, 11), eager)
    assert compiled_forward(model).experimental_get_tracing_count() == 1
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the compiled forward pass does not keep the model alive


class HandWrittenKeepBest(keras.callbacks.Callback):
    """The rule mstl used before Keras's EarlyStopping replaced it: the reference for the swap."""

    def __init__(self, patience: int):
        super().__init__()
        self.patience, self.best, self.best_epoch, self.best_weights = patience, -np.inf, -1, None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get("val_accuracy")
        if value is not None and value > self.best:
            self.best, self.best_epoch = float(value), epoch
            self.best_weights = self.model.get_weights()
        if self.patience and self.best_epoch >= 0 and epoch - self.best_epoch >= self.patience:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.model.set_weights(self.best_weights)


@pytest.mark.parametrize("patience", [0, 2])
def test_kerass_early_stopping_keeps_the_same_weights_as_the_hand_written_rule(patience):
    """Same seed, same data, 12 epochs: the same best epoch, the same epochs run and the kept
    weights equal bit for bit (tolerance 0)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] + rng.normal(size=64) > 0).astype("float32")

    def fit(callback):
        keras.utils.set_random_seed(0)
        dense = [keras.layers.Dense(8), keras.layers.Dense(1, activation="sigmoid")]
        model = keras.Sequential([keras.Input((4,)), *dense])
        model.compile(keras.optimizers.SGD(0.05), "binary_crossentropy", metrics=["accuracy"])
        run = model.fit(
            x[:48],
            y[:48],
            validation_data=(x[48:], y[48:]),
            epochs=12,
            verbose=0,
            callbacks=[callback],
            batch_size=8,
            shuffle=False,
        )
        return model.get_weights(), callback.best_epoch, len(run.history["loss"])

    old_weights, old_best, old_epochs = fit(HandWrittenKeepBest(patience))
    new_weights, new_best, new_epochs = fit(keep_best_weights(patience, epochs=12))
    assert (new_best, new_epochs) == (old_best, old_epochs)
    assert (
        old_best < old_epochs - 1
    )  # the kept weights are not the last epoch's: the rule is tested
    for old, new in zip(old_weights, new_weights, strict=True):
        np.testing.assert_array_equal(old, new)
