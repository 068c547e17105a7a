"""A registry of named backbones, in the manner of ``keras.applications``.

Each entry is the one place that knows a backbone's constructor, its own
``preprocess_input``, the head the paper puts on it, and its smallest input size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras


@dataclass(frozen=True)
class BackboneSpec:
    """How to build and feed one backbone."""

    name: str
    constructor: Callable[..., keras.Model]
    preprocess_input: Callable
    head: str  # "avgpool_flatten" (the paper's ResNet head) or "global_avgpool"
    min_size: int
    constructor_kwargs: tuple = ()
    # Only for backbones whose ImageNet file we know byte for byte (for prefetching from a mirror).
    imagenet_file: str | None = None
    imagenet_sha256: str | None = None
    imagenet_url: str | None = None
    keras_name: str = ""  # the name in Keras's weight file names, when it differs from ``name``

    @property
    def keras_weights_file(self) -> str:
        """The file keras.applications caches no-top ImageNet weights as (in ~/.keras/models)."""
        stem = self.keras_name or self.name
        return self.imagenet_file or f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"

    def build(
        self,
        weights: str | None,
        image_size: int | None,
        include_top: bool = False,
    ) -> keras.Model:
        kwargs = dict(self.constructor_kwargs)
        if not include_top:
            kwargs["input_shape"] = (image_size, image_size, 3)
        try:
            return self.constructor(include_top=include_top, weights=weights, **kwargs)
        except Exception as exc:
            if weights != "imagenet" or "URL fetch failure" not in str(exc):
                raise
            raise RuntimeError(
                f"could not download ImageNet weights for backbone {self.name!r} at "
                f"image_size={image_size}: {exc}. "
                "Offline, seed the Keras cache first (docs/getting-started.md)."
            ) from exc


_apps = keras.applications

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "resnet50v2", _apps.ResNet50V2, _apps.resnet_v2.preprocess_input, "avgpool_flatten", 32
        ),
        BackboneSpec(
            "resnet101v2",
            _apps.ResNet101V2,
            _apps.resnet_v2.preprocess_input,
            "avgpool_flatten",
            32,
        ),
        BackboneSpec(
            "densenet121", _apps.DenseNet121, _apps.densenet.preprocess_input, "global_avgpool", 32
        ),
        BackboneSpec(
            "densenet169", _apps.DenseNet169, _apps.densenet.preprocess_input, "global_avgpool", 32
        ),
        BackboneSpec(
            "inceptionv3",
            _apps.InceptionV3,
            _apps.inception_v3.preprocess_input,
            "global_avgpool",
            75,
            keras_name="inception_v3",
        ),
        BackboneSpec(
            "mobilenet_025",
            _apps.MobileNet,
            _apps.mobilenet.preprocess_input,
            "global_avgpool",
            32,
            constructor_kwargs=(("alpha", 0.25),),
            imagenet_file="mobilenet_2_5_224_tf_no_top.h5",
            imagenet_sha256="dbdb03ee2a22fd895301636cd328b234bb3a9952358f436d82f46b81e0d5b0bf",
            imagenet_url="https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/",
        ),
    )
}

PAPER_BACKBONES = ("resnet50v2", "resnet101v2", "densenet121", "densenet169")


def get_backbone(name: str) -> BackboneSpec:
    """Look a backbone up by name, with an error that lists the known names."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; known backbones: {', '.join(sorted(BACKBONES))}"
        ) from None


def check_image_size(spec: BackboneSpec, image_size: int) -> None:
    if image_size < spec.min_size:
        raise ValueError(
            f"image_size={image_size} is below the minimum of {spec.min_size} px for backbone "
            f"{spec.name!r}"
        )


def resolve_weights(weights: str | None) -> str | None:
    """Map the ``weights`` parameter to what Keras takes: 'imagenet', None, or an existing file
    path."""
    if weights is None or str(weights).lower() in ("none", "", "null"):
        return None
    if str(weights).lower() == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {weights!r} (use 'imagenet', 'none' or a path to a file)"
        )
    return str(path)


def prefetch_imagenet_weights(
    name: str, base_url: str | None = None, cache_dir: str | None = None
) -> str:
    """Download a backbone's ImageNet file into the Keras cache through Keras's own ``get_file``.

    ``base_url`` replaces Keras's storage URL (for a mirror, or a ``file://`` folder in tests);
    the file's SHA-256 is checked. Only backbones whose file hash we know can be prefetched;
    the others download on first use through ``keras.applications`` itself.
    """
    spec = get_backbone(name)
    if spec.imagenet_file is None:
        raise ValueError(f"no known ImageNet weights file to prefetch for backbone {name!r}")
    origin = (base_url or spec.imagenet_url).rstrip("/") + "/" + spec.imagenet_file
    if cache_dir:  # Keras silently falls back to /tmp/.keras when the folder does not exist yet
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return keras.utils.get_file(
        spec.imagenet_file,
        origin=origin,
        cache_subdir="models",
        file_hash=spec.imagenet_sha256,
        cache_dir=cache_dir,
    )
