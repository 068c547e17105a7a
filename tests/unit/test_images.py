"""Grey conversion and decoding, including bad files."""

import numpy as np
import pytest
from PIL import Image

from mstl.data.images import ImageReadError, decode_images, load_grey


def test_rgba_and_l_with_the_same_pixels_give_identical_arrays(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (50, 70), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    rgba = np.dstack([grey, grey, grey, rng.integers(0, 256, grey.shape, dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([grey] * 3), "RGB").save(tmp_path / "rgb.png")
    a, b, c = (load_grey(tmp_path / f, 32) for f in ("l.png", "rgba.png", "rgb.png"))
    assert a.shape == (32, 32) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    out = load_grey(tmp_path / "ramp16.png", 64)
    assert out.min() == 0 and out.max() == 255


def test_jpeg_data_with_a_png_name_decodes(data_root):
    # 34 COVID files are JPEG data named .png, as in the original release.
    path = next(
        p
        for p in sorted((data_root / "covid-ct" / "CT_COVID").glob("2020.03.1*"))
        if p.read_bytes()[:2] == b"\xff\xd8"
    )
    assert load_grey(path, 48).std() > 0


def test_zero_byte_image_is_named(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.png.*empty"):
        load_grey(tmp_path / "empty.png", 32)


def test_corrupt_image_is_named(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(good)
    bad = tmp_path / "truncated.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageReadError, match="truncated.png"):
        load_grey(bad, 32)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="text.png"):
        load_grey(tmp_path / "text.png", 32)


def test_decode_raises_unless_asked_to_skip_and_then_reports(tmp_path):
    paths = []
    for i in range(3):
        Image.fromarray(np.full((20, 20), i * 60, np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG junk")
    paths.insert(1, tmp_path / "bad.png")
    with pytest.raises(ImageReadError, match="bad.png"):
        decode_images(paths, 16)
    out = decode_images(paths, 16, skip_unreadable=True)
    assert out.kept == [0, 2, 3]
    assert out.pixels.shape == (3, 16, 16)
    assert [p for p, _ in out.unreadable] == [str(tmp_path / "bad.png")]
    assert out.pixels[2].mean() == 120
