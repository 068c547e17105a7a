"""Backbone registry, the paper's heads, freezing, and the frozen-feature cut."""

import keras
import numpy as np
import pytest

from mstl.models import (
    BACKBONES,
    PAPER_BACKBONES,
    TARGET_OUTPUT,
    OutputSpec,
    build_classifier,
    cache_cut_index,
    freeze_boundary,
    get_backbone,
    prefetch_imagenet_weights,
    reinitialise_head,
    split_at_cut,
)
from mstl.models.classifier import conv_layer_indices


def heavy(*names: str) -> list:
    """Backbones as test parameters: building a paper network takes seconds, so all but the CPU
    backbone (MobileNet-0.25) run with the integration tests."""
    mark = pytest.mark.integration
    return [n if n == "mobilenet_025" else pytest.param(n, marks=mark, id=n) for n in names]


TABLE_I = {
    "resnet50v2": 25_613_800,
    "resnet101v2": 44_675_560,
    "densenet121": 8_062_504,
    "densenet169": 14_307_880,
}


@pytest.mark.parametrize("name", heavy(*PAPER_BACKBONES))
def test_paper_backbones_have_table_i_parameter_counts(name):
    model = get_backbone(name).build(weights=None, image_size=None, include_top=True)
    assert model.count_params() == TABLE_I[name]
    keras.backend.clear_session()


def test_registry_has_the_papers_four_the_feature_extractor_and_the_cpu_backbone():
    assert set(BACKBONES) == set(PAPER_BACKBONES) | {"inceptionv3", "mobilenet_025"}


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="'vgg16'.*known backbones"):
        build_classifier("vgg16", weights=None, image_size=64)


@pytest.mark.parametrize("name, size", [("mobilenet_025", 31), ("inceptionv3", 74)])
def test_image_size_below_the_minimum_is_named(name, size):
    with pytest.raises(ValueError, match=f"image_size={size} is below the minimum"):
        build_classifier(name, weights=None, image_size=size)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.h5"):
        build_classifier("mobilenet_025", weights=str(tmp_path / "nowhere.h5"), image_size=64)


@pytest.mark.parametrize("name", heavy("mobilenet_025", "densenet121", "resnet50v2"))
def test_shallower_half_of_conv_layers_is_frozen(name):
    model = build_classifier(name, weights=None, image_size=64)
    convs = conv_layer_indices(model)
    frozen_convs = [i for i in convs if not model.layers[i].trainable]
    assert len(frozen_convs) == len(convs) // 2
    assert frozen_convs == convs[: len(convs) // 2]
    assert all(layer.trainable for layer in model.layers[freeze_boundary(model) :])
    keras.backend.clear_session()


@pytest.mark.parametrize(
    "name, head",
    [
        pytest.param("resnet50v2", ["head_avgpool", "head_flatten"], marks=pytest.mark.integration),
        pytest.param("densenet121", ["head_gap"], marks=pytest.mark.integration),
        ("mobilenet_025", ["head_gap"]),
    ],
)
def test_target_head_follows_the_paper(name, head):
    model = build_classifier(name, weights=None, image_size=64, output=TARGET_OUTPUT)
    names = [layer.name for layer in model.layers if layer.name.startswith("head_")]
    assert names == head + ["head_dense", "head_dropout", "head_output"]
    assert model.get_layer("head_dense").units == 1000
    assert model.get_layer("head_dropout").rate == 0.5
    assert model.get_layer("head_output").activation.__name__ == "sigmoid"
    assert model.output_shape == (None, 1)
    keras.backend.clear_session()


@pytest.mark.parametrize("name", heavy("mobilenet_025", "densenet121", "resnet50v2"))
def test_frozen_cut_reproduces_the_full_network(name):
    model = build_classifier(name, weights=None, image_size=64)
    cut = cache_cut_index(model)
    assert cut is not None and cut < freeze_boundary(model)
    bottom, top = split_at_cut(model, cut)
    x = np.random.default_rng(0).normal(size=(3, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(top(bottom(x)), model(x), rtol=1e-4, atol=1e-5)
    # the top shares the full model's layers, so training it trains the full model
    assert any(layer is model.layers[-1] for layer in top.layers)
    keras.backend.clear_session()


# The cut each backbone had when it was found from Keras's private node lists, before the public
# config replaced them: the frozen-feature cache must not move.
CUT_INDEX = {
    "mobilenet_025": 42,
    "resnet50v2": 87,
    "resnet101v2": 185,
    "densenet121": 210,
    "densenet169": 294,
    "inceptionv3": 132,
}


def test_every_backbone_has_its_known_cut():
    assert set(CUT_INDEX) == set(BACKBONES)


@pytest.mark.parametrize("name", heavy(*sorted(CUT_INDEX)))
def test_frozen_cut_index_per_backbone(name):
    model = build_classifier(name, weights=None, image_size=75)
    assert cache_cut_index(model) == CUT_INDEX[name]
    target = reinitialise_head(model, TARGET_OUTPUT, get_backbone(name))
    assert cache_cut_index(target) == CUT_INDEX[name]  # the head does not move the cut
    keras.backend.clear_session()


def small_net(relu_calls: int) -> keras.Model:
    """Convs a, b (with a skip around b), c, then a ReLU called ``relu_calls`` times, then d, e, f:
    a, b and c are the frozen half."""
    x = inputs = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(2, 3, padding="same", name="a")(x)
    b = keras.layers.Conv2D(2, 3, padding="same", name="b")(a)
    x = keras.layers.Add(name="add")([a, b])
    x = keras.layers.Conv2D(2, 3, padding="same", name="c")(x)
    relu = keras.layers.ReLU(name="relu")
    for _ in range(relu_calls):
        x = relu(x)
    for name in "def":
        x = keras.layers.Conv2D(2, 3, padding="same", name=name)(x)
    return keras.Model(inputs, x)


def names_at(model: keras.Model, *indices: int) -> list[str]:
    return [model.layers[i].name for i in indices]


def test_the_cut_is_never_inside_a_skip_nor_at_a_layer_called_twice():
    once = small_net(relu_calls=1)
    assert names_at(once, freeze_boundary(once), cache_cut_index(once)) == ["d", "relu"]
    twice = small_net(relu_calls=2)  # the ReLU's output is two tensors: no cut there
    assert names_at(twice, freeze_boundary(twice), cache_cut_index(twice)) == ["d", "c"]
    skip = keras.Model(once.input, once.get_layer("add").output)  # convs a and b: boundary b
    assert names_at(skip, freeze_boundary(skip), cache_cut_index(skip)) == ["b", "a"]
    # "a" feeds both "b" and "add", so no cut lies between "a" and "add"
    deeper = keras.Model(once.input, once.get_layer("d").output)  # convs a to d: boundary c
    assert names_at(deeper, freeze_boundary(deeper), cache_cut_index(deeper)) == ["c", "add"]


def test_reinitialised_head_keeps_the_base_and_replaces_the_output():
    source = build_classifier(
        "mobilenet_025", weights=None, image_size=64, output=OutputSpec("categorical", 4)
    )
    target = reinitialise_head(source, TARGET_OUTPUT, get_backbone("mobilenet_025"))
    assert target.output_shape == (None, 1)
    assert target.get_layer("conv1") is source.get_layer("conv1")
    assert target.get_layer("head_dense") is not source.get_layer("head_dense")


def test_imagenet_weights_download_through_keras_from_a_file_url(tmp_path, keras_home):
    mirror = keras_home / "models"
    path = prefetch_imagenet_weights(
        "mobilenet_025", base_url=mirror.as_uri(), cache_dir=str(tmp_path)
    )
    assert path.startswith(str(tmp_path))
    model = build_classifier("mobilenet_025", weights=path, image_size=224)
    reference = keras.applications.MobileNet(
        alpha=0.25, include_top=False, weights=path, input_shape=(224, 224, 3)
    )
    np.testing.assert_array_equal(
        model.get_layer("conv1").get_weights()[0], reference.get_layer("conv1").get_weights()[0]
    )


def test_imagenet_download_with_wrong_bytes_fails(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / get_backbone("mobilenet_025").imagenet_file).write_bytes(b"not the weights")
    with pytest.raises(Exception, match="(?i)hash|integrity|corrupt"):
        prefetch_imagenet_weights(
            "mobilenet_025", base_url=mirror.as_uri(), cache_dir=str(tmp_path / "cache")
        )
