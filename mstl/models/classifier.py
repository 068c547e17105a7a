"""The paper's classifiers: a backbone, its head, and the shallower half of its conv layers
frozen."""

from __future__ import annotations

from dataclasses import dataclass

import keras

from mstl import defaults
from mstl.models.backbones import BackboneSpec, check_image_size, get_backbone, resolve_weights

CONV_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
HEAD_PREFIX = "head_"


@dataclass(frozen=True)
class OutputSpec:
    """What the network predicts: ``binary`` (sigmoid, BCE) or ``categorical`` over ``n_classes``
    (softmax, sparse CCE)."""

    kind: str = "binary"
    n_classes: int = 1
    dropout: float = 0.0

    @property
    def loss(self) -> str:
        return "binary_crossentropy" if self.kind == "binary" else "sparse_categorical_crossentropy"

    def __post_init__(self) -> None:
        if self.kind not in ("binary", "categorical"):
            raise ValueError(f"unknown output kind {self.kind!r}; use 'binary' or 'categorical'")
        if self.kind == "categorical" and self.n_classes < 2:
            raise ValueError(f"a categorical output needs at least 2 classes, got {self.n_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


TARGET_OUTPUT = OutputSpec("binary", 1, defaults.DROPOUT)


def add_head(
    base: keras.Model,
    spec: BackboneSpec,
    output: OutputSpec,
    dense_units: int = defaults.DENSE_UNITS,
    dense_activation: str = defaults.DENSE_ACTIVATION,
    pool_size: int = defaults.POOL_SIZE,
) -> keras.Model:
    """Put the paper's head on a conv base. Head layers are named ``head_*`` so they can be
    re-initialised."""
    x = base.output
    if spec.head == "avgpool_flatten":
        side = min(pool_size, int(x.shape[1]), int(x.shape[2]))
        x = keras.layers.AveragePooling2D(pool_size=side, name=HEAD_PREFIX + "avgpool")(x)
        x = keras.layers.Flatten(name=HEAD_PREFIX + "flatten")(x)
    else:
        x = keras.layers.GlobalAveragePooling2D(name=HEAD_PREFIX + "gap")(x)
    x = keras.layers.Dense(dense_units, activation=dense_activation, name=HEAD_PREFIX + "dense")(x)
    if output.dropout:
        x = keras.layers.Dropout(output.dropout, name=HEAD_PREFIX + "dropout")(x)
    if output.kind == "binary":
        y = keras.layers.Dense(1, activation="sigmoid", name=HEAD_PREFIX + "output")(x)
    else:
        y = keras.layers.Dense(output.n_classes, activation="softmax", name=HEAD_PREFIX + "output")(
            x
        )
    return keras.Model(base.input, y, name=f"{spec.name}_{output.kind}")


def build_classifier(
    backbone: str,
    weights: str | None = defaults.WEIGHTS,
    image_size: int = defaults.IMAGE_SIZE,
    output: OutputSpec = TARGET_OUTPUT,
    dense_units: int = defaults.DENSE_UNITS,
    dense_activation: str = defaults.DENSE_ACTIVATION,
    pool_size: int = defaults.POOL_SIZE,
    train_batchnorm: bool = defaults.TRAIN_BATCHNORM,
) -> keras.Model:
    """Build backbone + head with the shallower half of the conv layers frozen."""
    spec = get_backbone(backbone)
    check_image_size(spec, image_size)
    base = spec.build(resolve_weights(weights), image_size)
    model = add_head(base, spec, output, dense_units, dense_activation, pool_size)
    freeze_shallow_half(model, train_batchnorm)
    return model


def conv_layer_indices(model: keras.Model) -> list[int]:
    return [i for i, layer in enumerate(model.layers) if isinstance(layer, CONV_TYPES)]


def freeze_boundary(model: keras.Model) -> int:
    """Index of the first trainable layer.

    "Half" counts conv layers (Conv2D, DepthwiseConv2D, SeparableConv2D) in the order Keras lists
    them (topological): with n of them, the first n // 2 are frozen together with every layer
    before the (n // 2 + 1)-th conv layer, so each frozen conv keeps its BatchNorm and activation.
    """
    convs = conv_layer_indices(model)
    if len(convs) < 2:
        raise ValueError(f"model {model.name!r} has {len(convs)} conv layers; cannot freeze half")
    return convs[len(convs) // 2]


def freeze_shallow_half(
    model: keras.Model, train_batchnorm: bool = defaults.TRAIN_BATCHNORM
) -> int:
    """Freeze layers before :func:`freeze_boundary`; frozen BatchNorm layers run in inference mode.

    With ``train_batchnorm=False`` the BatchNorm layers of the deeper half stay frozen as well
    (their ImageNet statistics and scale are kept), as the Keras fine-tuning guide advises for small
    data.
    """
    boundary = freeze_boundary(model)
    for i, layer in enumerate(model.layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = i >= boundary and (train_batchnorm or not is_bn)
    return boundary


def _inbound_layer_names(serialized: object) -> list[str]:
    """The layers whose outputs a serialized call (a node of ``get_config``) reads, in order.

    Keras writes each input tensor of a call as a ``__keras_tensor__`` whose ``keras_history``
    starts with the producing layer's name; the tensors may sit in nested args and kwargs.
    """
    if isinstance(serialized, dict):
        if serialized.get("class_name") == "__keras_tensor__":
            return [serialized["config"]["keras_history"][0]]
        return [name for value in serialized.values() for name in _inbound_layer_names(value)]
    if isinstance(serialized, list | tuple):
        return [name for value in serialized for name in _inbound_layer_names(value)]
    return []


def _layer_graph(model: keras.Model) -> tuple[list[int], list[int]]:
    """Per layer of ``model``: how many times the model calls it, and the deepest layer that reads
    its output (the layer itself if none does).

    Read from the model's public config, the graph Keras itself saves, rather than from the
    layers' private node lists. An input layer counts no calls (its config has no inbound node).
    """
    index = {layer.name: i for i, layer in enumerate(model.layers)}
    calls = [0] * len(index)
    last_consumer = list(range(len(index)))
    for layer_config in model.get_config()["layers"]:
        j = index.get(layer_config["name"])
        if j is None:  # an operation that is not a layer: not a place to cut
            continue
        calls[j] = len(layer_config["inbound_nodes"])
        for name in _inbound_layer_names(layer_config["inbound_nodes"]):
            src = index.get(name)
            if src is not None:
                last_consumer[src] = max(last_consumer[src], j)
    return calls, last_consumer


def cache_cut_index(model: keras.Model) -> int | None:
    """The deepest frozen layer whose output alone carries everything deeper layers need.

    When augmentation is off, the frozen layers are a fixed function of the input, so their output
    at such a cut can be computed once and reused every epoch. Returns None if there is no cut.
    """
    calls, last_consumer = _layer_graph(model)
    best = None
    reach = 0
    for i in range(freeze_boundary(model)):
        # A cut after layer i is valid if no layer before i feeds a layer after i, and layer i is
        # called once (so its output is one tensor).
        if i > 0 and reach <= i and calls[i] == 1:
            best = i
        reach = max(reach, last_consumer[i])
    return best


def split_at_cut(model: keras.Model, cut: int) -> tuple[keras.Model, keras.Model]:
    """The frozen part up to ``cut`` and the rest, sharing layers (and so weights) with
    ``model``."""
    cut_tensor = model.layers[cut].output
    bottom = keras.Model(model.input, cut_tensor, name=model.name + "_frozen")
    top = keras.Model(cut_tensor, model.output, name=model.name + "_top")
    return bottom, top


def reinitialise_head(
    model: keras.Model,
    output: OutputSpec,
    spec: BackboneSpec,
    train_batchnorm: bool = defaults.TRAIN_BATCHNORM,
    **head_kwargs,
) -> keras.Model:
    """Drop the ``head_*`` layers and put a fresh head (the Target step's Dropout(0.5) + sigmoid) on
    the conv base."""
    last_base = max(
        i for i, layer in enumerate(model.layers) if not layer.name.startswith(HEAD_PREFIX)
    )
    base = keras.Model(model.input, model.layers[last_base].output)
    new = add_head(base, spec, output, **head_kwargs)
    freeze_shallow_half(new, train_batchnorm)
    return new
