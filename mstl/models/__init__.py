"""Backbones by name, the paper's heads, and freezing of the shallower half of conv layers."""

from mstl import tensorflow_build

tensorflow_build()  # one TensorFlow build, or an error that says how to install it

from mstl.models.backbones import (
    BACKBONES,
    PAPER_BACKBONES,
    BackboneSpec,
    check_image_size,
    get_backbone,
    prefetch_imagenet_weights,
    resolve_weights,
)
from mstl.models.classifier import (
    TARGET_OUTPUT,
    OutputSpec,
    build_classifier,
    cache_cut_index,
    freeze_boundary,
    freeze_shallow_half,
    reinitialise_head,
    split_at_cut,
)

__all__ = [
    "BACKBONES",
    "PAPER_BACKBONES",
    "BackboneSpec",
    "OutputSpec",
    "TARGET_OUTPUT",
    "build_classifier",
    "cache_cut_index",
    "check_image_size",
    "freeze_boundary",
    "freeze_shallow_half",
    "get_backbone",
    "prefetch_imagenet_weights",
    "reinitialise_head",
    "resolve_weights",
    "split_at_cut",
]
