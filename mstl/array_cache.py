"""An on-disk, content-addressed cache of arrays, shared by the processes of one machine (or one
shared folder).

Used for what many runs of a grid compute identically: the decoded slices of a data set (key: the
files' SHA-256s and the preprocessing) and the frozen lower half's features of those slices (key:
the frozen weights, the slices' pixels and the backbone). A key is a SHA-256 of everything the value
depends on, so a changed input is a different entry, never a stale hit.

Each entry is ``<key>.npy`` beside ``<key>.json`` holding the array file's SHA-256 and size. An
entry is written to a temporary file and renamed into place, so a reader never sees half a file; on
reading, the file is checked against its record, and an entry that fails (truncated, corrupt, record
missing) is recomputed and replaced, never loaded. Two processes computing one entry at once both
write the same bytes; the last rename wins.

An entry too large for memory (the frozen features of the paper's Transition set, up to 7.6 GiB) is
filled batch by batch into a memory-mapped temporary ``.npy`` and renamed into place the same way
(``get_mapped``); it is read back memory-mapped, never whole. A run killed while filling leaves only
a ``*.npy.tmp`` file, which no reader opens.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

KEY_VERSION = b"mstl-array-cache-v1"


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (``hashlib.file_digest``, read in chunks): the one file hash
    of the project (downloads, data sets, exports, cache keys)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def content_key(parts: Iterable[bytes | str | np.ndarray]) -> str:
    """SHA-256 over the parts, each length-prefixed (so ("ab", "c") and ("a", "bc") differ); arrays
    by dtype, shape and bytes."""
    digest = hashlib.sha256(KEY_VERSION)
    for part in parts:
        if isinstance(part, np.ndarray):
            part = np.ascontiguousarray(part)
            header = f"{part.dtype.str}{part.shape}".encode()
            digest.update(len(header).to_bytes(8, "little") + header)
            digest.update(part.nbytes.to_bytes(8, "little"))
            digest.update(memoryview(part).cast("B"))
            continue
        data = part.encode() if isinstance(part, str) else bytes(part)
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


class DiskSpaceError(OSError):
    """Too little free disk for an array that must live on disk."""


def require_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Raise before writing ``needed`` bytes into ``folder`` when its disk has less free (the
    folder's nearest existing parent is asked), naming the folder and both sizes."""
    probe = Path(folder).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DiskSpaceError(
            f"{what} needs {needed} bytes ({needed / 1024**3:.2f} GiB) on disk in {folder}, "
            f"which has {free} bytes ({free / 1024**3:.2f} GiB) free; free some space or point "
            "the array cache (or TMPDIR) at a larger disk"
        )


def outcome(cache: ArrayCache | None, kind: str) -> str:
    """off, hit or miss: how a run's use of the cache for one kind of array fared (miss if any part
    of it missed)."""
    if cache is None:
        return "off"
    return "miss" if cache.misses.get(kind) else "hit" if cache.hits.get(kind) else "off"


class ArrayCache:
    """``get(kind, key, compute)``: the cached array, or ``compute()`` stored; counts hits and
    misses."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.hits: dict[str, int] = {}
        self.misses: dict[str, int] = {}
        self.rejected: list[str] = []  # entries found damaged and recomputed

    def path(self, kind: str, key: str) -> Path:
        return self.folder / kind / f"{key}.npy"

    def load(self, kind: str, key: str, mmap: bool = False) -> np.ndarray | None:
        """The stored array (memory-mapped read-only with ``mmap``), or None when absent or damaged
        (then reported, and later rewritten)."""
        data, record = self.path(kind, key), self.path(kind, key).with_suffix(".json")
        if not data.exists():
            return None
        try:
            expected = json.loads(record.read_text())
            if data.stat().st_size != expected["bytes"] or sha256_file(data) != expected["sha256"]:
                raise ValueError("the file does not match its record (truncated or corrupt)")
            return np.load(data, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, KeyError) as exc:
            self.rejected.append(str(data))
            print(f"array cache: {data} is damaged ({type(exc).__name__}: {exc}); recomputing it")
            return None

    def store(self, kind: str, key: str, array: np.ndarray) -> None:
        target = self.path(kind, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".npy.tmp", delete=False) as tmp:
            np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)
        self.commit(Path(tmp.name), target, array.shape)

    def commit(self, written: Path, target: Path, shape: tuple[int, ...]) -> None:
        """Record a fully written temporary array file and rename both into place."""
        record = {"sha256": sha256_file(written), "bytes": written.stat().st_size}
        record["shape"] = list(shape)
        with tempfile.NamedTemporaryFile(
            "w", dir=target.parent, suffix=".json.tmp", delete=False
        ) as rec:
            json.dump(record, rec)
        # the record first: a reader that sees the new array also sees its record (an old record
        # fails the check)
        os.replace(rec.name, target.with_suffix(".json"))
        os.replace(written, target)

    def count(self, kind: str, hit: bool) -> None:
        counter = self.hits if hit else self.misses
        counter[kind] = counter.get(kind, 0) + 1

    def get(self, kind: str, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        array = self.load(kind, key)
        self.count(kind, array is not None)
        if array is not None:
            return array
        array = compute()
        self.store(kind, key, array)
        return array

    def get_mapped(
        self,
        kind: str,
        key: str,
        shape: tuple[int, ...],
        fill: Callable[[np.ndarray], None],
    ) -> np.ndarray:
        """The cached float32 array memory-mapped read-only, or, on a miss, ``fill`` writing it
        batch by batch into a memory-mapped temporary file that is then recorded and renamed into
        place: the array is never whole in memory. Raises :class:`DiskSpaceError` first when the
        folder's disk is too small."""
        array = self.load(kind, key, mmap=True)
        self.count(kind, array is not None)
        if array is not None:
            return array
        target = self.path(kind, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        require_free_space(target.parent, mapped_bytes(shape), f"the {kind} array {shape}")
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".npy.tmp", delete=False) as tmp:
            written = Path(tmp.name)
        try:
            out = np.lib.format.open_memmap(written, mode="w+", dtype=np.float32, shape=shape)
            fill(out)
            out.flush()
            del out
            self.commit(written, target, shape)
        except BaseException:
            written.unlink(missing_ok=True)
            raise
        return np.load(target, mmap_mode="r", allow_pickle=False)


def mapped_bytes(shape: tuple[int, ...]) -> int:
    """The bytes of a float32 ``.npy`` file of ``shape``: the data and (at most) a 4 KiB
    header."""
    return 4 * int(np.prod(shape)) + 4096
