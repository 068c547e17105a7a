"""The on-disk, content-addressed array cache and the decoded-slice cache built on it."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from mstl.array_cache import ArrayCache, content_key, require_free_space, sha256_file
from mstl.data.images import decode_images, decode_images_cached
from mstl.data.preprocessing import Preprocessing


def test_keys_change_with_any_part_and_are_unambiguous():
    a = np.arange(6, dtype=np.float32)
    assert content_key(["x", a]) == content_key(["x", a.copy()])
    assert content_key(["x", a]) != content_key(["x", a.reshape(2, 3)])  # shape is part of the key
    assert content_key(["x", a]) != content_key(["x", a.astype(np.float64)])
    assert content_key(["ab", "c"]) != content_key(["a", "bc"])


def test_store_load_count_and_a_damaged_entry_is_recomputed_never_loaded(tmp_path, capsys):
    cache = ArrayCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return np.full((3, 4), 7, dtype=np.float32)

    first = cache.get("frozen", "k", compute)
    np.testing.assert_array_equal(cache.get("frozen", "k", compute), first)
    assert len(calls) == 1 and cache.misses == {"frozen": 1} and cache.hits == {"frozen": 1}
    record = json.loads((tmp_path / "frozen" / "k.json").read_text())
    assert record["shape"] == [3, 4] and len(record["sha256"]) == 64
    path = tmp_path / "frozen" / "k.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    fresh = ArrayCache(tmp_path)
    np.testing.assert_array_equal(fresh.get("frozen", "k", compute), first)
    assert (
        len(calls) == 2
        and fresh.rejected == [str(path)]
        and "is damaged" in capsys.readouterr().out
    )
    (tmp_path / "frozen" / "k.json").unlink()  # a record lost
    assert ArrayCache(tmp_path).load("frozen", "k") is None
    assert not list((tmp_path / "frozen").glob("*.tmp"))  # no temporary file left behind


def write_images(folder, n=4):
    paths = []
    for i in range(n):
        image = Image.new("L", (80, 80), 20 + 40 * i)
        path = folder / f"{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def test_decoded_slices_are_cached_by_file_content_and_preprocessing(tmp_path):
    paths = write_images(tmp_path)
    cache = ArrayCache(tmp_path / "cache")
    prep = Preprocessing(32, lung_crop=True)
    first = decode_images_cached(paths, prep, cache=cache)
    second = decode_images_cached(paths, prep, cache=cache)
    assert cache.misses == {"decoded": 1} and cache.hits == {"decoded": 1}
    np.testing.assert_array_equal(first.pixels, second.pixels)
    np.testing.assert_array_equal(second.pixels, decode_images(paths, prep).pixels)
    assert (
        second.lung_field_missing == first.lung_field_missing == [0, 1, 2, 3]
    )  # flat images: no lung field
    decode_images_cached(
        paths, Preprocessing(32, lung_crop=True, intensity="equalize"), cache=cache
    )
    Image.new("L", (80, 80), 200).save(paths[0])  # one file's content changed
    decode_images_cached(paths, prep, cache=cache)
    assert cache.misses == {"decoded": 3}


def test_a_set_with_a_missing_or_unreadable_file_is_not_cached(tmp_path):
    from mstl.data.images import ImageReadError

    paths = write_images(tmp_path)
    cache = ArrayCache(tmp_path / "cache")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    decoded = decode_images_cached([*paths, tmp_path / "bad.png"], Preprocessing(32), True, cache)
    assert (
        len(decoded.pixels) == 4
        and decoded.unreadable
        and not (tmp_path / "cache" / "decoded").exists()
    )
    with pytest.raises(ImageReadError, match="gone.png"):
        decode_images_cached([*paths, tmp_path / "gone.png"], Preprocessing(32), False, cache)


def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path):
    """hashlib.file_digest (the stdlib twin of the old chunked loop): the same hex digest, for an
    empty file, a small one and one larger than a read buffer."""
    rng = np.random.default_rng(0)
    for name, size in (("empty", 0), ("small", 5), ("large", (1 << 20) * 3 + 7)):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        (tmp_path / name).write_bytes(data)
        assert sha256_file(tmp_path / name) == hashlib.sha256(data).hexdigest()


def test_a_mapped_entry_is_filled_in_place_recorded_and_read_back_as_a_read_only_map(tmp_path):
    cache = ArrayCache(tmp_path)
    calls = []

    def fill(out):
        calls.append(type(out))
        for start in range(0, 6, 4):  # batch by batch, as the frozen half writes it
            out[start : start + 4] = np.arange(start, min(start + 4, 6))[:, None, None]

    first = cache.get_mapped("frozen", "k", (6, 2, 3), fill)
    again = ArrayCache(tmp_path).get_mapped("frozen", "k", (6, 2, 3), fill)
    assert calls == [np.memmap]  # filled once, into a memory map
    for array in (first, again):
        assert isinstance(array, np.memmap) and not array.flags.writeable
        np.testing.assert_array_equal(array[:, 0, 0], np.arange(6))
    record = json.loads((tmp_path / "frozen" / "k.json").read_text())
    assert record["shape"] == [6, 2, 3]
    assert record["sha256"] == sha256_file(tmp_path / "frozen" / "k.npy")
    np.testing.assert_array_equal(cache.load("frozen", "k"), first)  # the same .npy as store()


def test_a_fill_killed_midway_leaves_no_entry_and_no_temporary_file(tmp_path):
    cache = ArrayCache(tmp_path)

    def interrupted(out):
        out[:2] = 1.0
        raise KeyboardInterrupt  # the run stopped while writing

    with pytest.raises(KeyboardInterrupt):
        cache.get_mapped("frozen", "k", (4, 3), interrupted)
    assert not list((tmp_path / "frozen").iterdir())
    assert cache.load("frozen", "k") is None


def test_free_space_is_checked_on_the_disk_of_the_nearest_existing_folder(tmp_path):
    require_free_space(tmp_path / "not" / "yet", 1, "one byte")  # fits
    with pytest.raises(OSError, match=r"one petabyte needs 1000000000000000 bytes .* in "):
        require_free_space(tmp_path / "not" / "yet", 10**15, "one petabyte")
