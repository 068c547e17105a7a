"""Target data (COVID-CT), image decoding to grey, and the tf.data pipeline."""

from mstl.data.covid_ct import (
    SPLIT_MODES,
    files_sha256,
    index_images,
    load_split,
    split_sha256,
    split_table,
)
from mstl.data.images import DecodedImages, ImageReadError, decode_images, load_grey, to_grey

__all__ = [
    "SPLIT_MODES",
    "DecodedImages",
    "ImageReadError",
    "decode_images",
    "files_sha256",
    "index_images",
    "load_grey",
    "load_split",
    "split_sha256",
    "split_table",
    "to_grey",
]
