"""The anti-shortcut preprocessing: lung crop and intensity normalisation, the same in every
stage."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from mstl.data.images import decode_images
from mstl.data.preprocessing import Preprocessing, clahe, lung_box, mask_outside_lungs


def synthetic_slice(width=256, height=256, caption=True) -> Image.Image:
    """Black outside air, a bright body, two dark lungs at rows 80..160 and columns 60..120 /
    140..200, and a bright caption block below the body, as on a slice cut from a paper."""
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 40, 236, 200), fill=180)
    draw.rectangle((60, 80, 119, 159), fill=30)
    draw.rectangle((140, 80, 199, 159), fill=30)
    if caption:
        draw.rectangle((10, 220, 120, 245), fill=255)
    return image


def test_clahe_with_one_tile_and_no_clip_is_histogram_equalisation_by_hand():
    grey = np.array([[0, 0], [1, 2]], dtype=np.uint8)
    # cumulative counts 2, 3, 4 of 4 pixels -> 255 * (0.5, 0.75, 1.0)
    assert clahe(grey, tiles=1, clip_limit=1000).tolist() == [[128, 128], [191, 255]]


def test_clahe_raises_local_contrast_without_blocks_and_limits_it_on_flat_regions():
    rng = np.random.default_rng(0)
    low = (100 + 10 * rng.random((128, 128))).astype(np.uint8)  # grey levels 100..109 only
    out = clahe(low)
    # contrast is raised, but a grey level's slope is at most the clip limit (2) plus the
    # redistributed excess (at most 1): the bound that keeps CLAHE from amplifying noise
    assert 2 * low.std() < out.std() <= 3 * low.std()
    assert np.abs(np.diff(out.astype(int), axis=1)).mean() < 60  # blended between tiles, not blocky
    flat = np.full((64, 64), 90, dtype=np.uint8)
    assert len(np.unique(clahe(flat))) == 1  # a flat image stays flat
    # sides not a multiple of the tiles
    assert clahe(np.zeros((50, 70), dtype=np.uint8)).shape == (50, 70)


def test_lung_box_frames_both_lungs_squarely_with_the_margin_and_leaves_out_the_caption():
    box = lung_box(synthetic_slice())
    left, top, right, bottom = box
    assert right - left == bottom - top  # square: the anatomy keeps its aspect ratio
    assert left <= 60 and right >= 200 and top <= 80 and bottom >= 160  # both lungs inside
    assert right - left == pytest.approx(140 * 1.2, abs=2)  # the wider side plus 10 % on each side
    assert bottom < 220  # the caption block below the body is cut away


def test_lung_box_is_found_on_a_reduced_copy_of_a_large_slice_and_scaled_back():
    big = synthetic_slice().resize((1024, 1024), Image.Resampling.NEAREST)
    left, top, right, bottom = lung_box(big)
    assert left <= 240 and right >= 800 and top <= 320 and bottom >= 640 and bottom < 880


def test_a_slice_without_a_lung_field_is_kept_whole_and_reported():
    flat = Image.new("L", (100, 80), 120)
    pixels, found = Preprocessing(32, lung_crop=True).apply(flat)
    assert not found and pixels.shape == (32, 32)
    np.testing.assert_array_equal(pixels, Preprocessing(32)(flat))  # the plain resize
    assert Preprocessing(32).apply(flat)[1]  # without lung_crop, nothing is missing


def test_intensity_options_and_bad_values():
    image = synthetic_slice()
    plain = Preprocessing(64)(image)
    np.testing.assert_array_equal(
        Preprocessing(64, intensity="equalize")(image),
        np.asarray(ImageOps.equalize(Image.fromarray(plain))),
    )
    np.testing.assert_array_equal(Preprocessing(64, intensity="clahe")(image), clahe(plain))
    with pytest.raises(ValueError, match="unknown intensity 'gamma'"):
        Preprocessing(64, intensity="gamma")
    # a served model logged before these options existed used neither
    assert Preprocessing.from_config({"image_size": 64, "backbone": "x"}) == Preprocessing(64)
    p = Preprocessing(96, True, "clahe")
    assert Preprocessing.from_config(p.config()) == p


def test_training_and_serving_prepare_a_file_identically(tmp_path):
    """decode_images (training) and request_grey (served model, evaluate, explain) give the same
    pixels."""
    from mstl import defaults
    from mstl.inference.pyfunc import request_grey, serving_config

    path = tmp_path / "slice.png"
    synthetic_slice(300, 260).convert("RGB").save(path)
    (tmp_path / "flat.png").write_bytes(_png(Image.new("L", (90, 90), 100)))
    prep = Preprocessing(48, lung_crop=True, intensity="clahe")
    decoded = decode_images([path, tmp_path / "flat.png"], prep)
    config = serving_config("mobilenet_025", prep, 0.5)
    assert config["window_width"] == defaults.WINDOW_WIDTH
    np.testing.assert_array_equal(decoded.pixels[0], request_grey(path.read_bytes(), config))
    assert decoded.lung_field_missing == [1]  # the flat image: no lung field, used whole


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_lung_mask_blacks_out_everything_but_the_lungs():
    image = synthetic_slice()
    pixels, found = Preprocessing(256, lung_mask=True).apply(image)
    whole = np.asarray(image)
    assert found
    assert pixels[230, 60] == 0 and whole[230, 60] == 255  # the caption is gone
    assert pixels[60, 128] == 0 and whole[60, 128] == 180  # so is the body above the lungs
    np.testing.assert_array_equal(pixels[85:155, 65:115], whole[85:155, 65:115])  # lungs kept
    assert pixels[120, 58] == 180  # the widened field keeps a rim of the chest wall (pleura)


def test_lung_mask_leaves_a_slice_without_lung_field_whole_and_says_so():
    flat = Image.new("L", (64, 64), 100)
    pixels, found = Preprocessing(32, lung_mask=True).apply(flat)
    assert not found and (pixels == 100).all()
    assert mask_outside_lungs(np.full((16, 16), 100, np.uint8)) is None


def test_training_and_serving_mask_a_file_identically(tmp_path):
    from mstl.inference.pyfunc import request_grey, serving_config

    path = tmp_path / "slice.png"
    synthetic_slice(300, 260).save(path)
    prep = Preprocessing(64, lung_crop=True, intensity="equalize", lung_mask=True)
    decoded = decode_images([path], prep)
    config = serving_config("mobilenet_025", prep, 0.5, "flip", 1.7)
    assert Preprocessing.from_config(config) == prep
    served = request_grey(path.read_bytes(), config)
    np.testing.assert_array_equal(decoded.pixels[0], served)
    assert (served == 0).mean() > 0.2  # the mask acted
