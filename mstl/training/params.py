"""Parameters every training stage shares: which network, and how it is fitted."""

from __future__ import annotations

from dataclasses import dataclass, fields

import keras

from mstl import defaults
from mstl.array_cache import ArrayCache
from mstl.data.pipeline import augment_policy
from mstl.data.preprocessing import Preprocessing
from mstl.models import OutputSpec, build_classifier, get_backbone
from mstl.models.backbones import check_image_size
from mstl.training.fit import DISTRIBUTE, FitConfig, FitSettings


@dataclass(frozen=True)
class ClassifierParams(FitSettings):
    """The backbone, its head and freezing, and the SGD fit; Transition and Target add their own."""

    backbone: str = defaults.BACKBONE
    weights: str = defaults.WEIGHTS
    image_size: int = defaults.IMAGE_SIZE
    lung_crop: bool = False  # crop to the lung field before resizing (mstl.data.preprocessing)
    intensity: str = "none"  # none, clahe or equalize, after resizing
    dense_units: int = defaults.DENSE_UNITS
    dense_activation: str = defaults.DENSE_ACTIVATION
    pool_size: int = defaults.POOL_SIZE
    train_batchnorm: bool = defaults.TRAIN_BATCHNORM
    distribute: str = "none"
    # CPU, memory (and GPU) use of the run, sampled by MLflow (psutil)
    log_system_metrics: bool = False
    # a folder for the on-disk, content-addressed cache of decoded slices and frozen-half features
    # that runs (and processes) share; empty: none. The experiment grid uses <cache_dir>/arrays.
    array_cache_dir: str = ""

    def validate_network(self) -> None:
        """Fail on an unknown backbone, a too-small image or an unknown distribution before any
        data is read."""
        check_image_size(get_backbone(self.backbone), self.image_size)
        self.preprocessing  # noqa: B018 (validates intensity)
        if self.distribute not in DISTRIBUTE:
            raise ValueError(f"distribute must be one of {DISTRIBUTE}, got {self.distribute!r}")

    def array_cache(self) -> ArrayCache | None:
        return ArrayCache(self.array_cache_dir) if self.array_cache_dir else None

    @property
    def preprocessing(self) -> Preprocessing:
        """How a decoded slice becomes the network's input; stored with the served model."""
        return Preprocessing(self.image_size, self.lung_crop, self.intensity)

    def fit_config(self, class_weight: dict[int, float] | None = None) -> FitConfig:
        settings = {f.name: getattr(self, f.name) for f in fields(FitSettings)}
        # the policy's name, or False for none: fit_classifier keeps the frozen-half cache only
        # when augment is falsy, and hands the policy to image_dataset
        policy = augment_policy(self.augment)
        settings["augment"] = False if policy == "none" else policy
        return FitConfig(**settings, class_weight=class_weight)

    def build(self, output: OutputSpec, weights: str | None = None) -> keras.Model:
        """The paper's network for this stage (``weights`` overrides the parameter, e.g.
        ``none``)."""
        return build_classifier(
            self.backbone,
            self.weights if weights is None else weights,
            self.image_size,
            output,
            self.dense_units,
            self.dense_activation,
            self.pool_size,
            self.train_batchnorm,
        )
