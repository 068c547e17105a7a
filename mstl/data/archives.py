"""Safe zip extraction, for every download: regular files only, inside the target folder, and an
archive with one unsafe member (absolute path, drive letter, '..', symbolic link) refused whole,
naming the member, before anything is written."""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath


class UnsafeArchiveError(ValueError):
    """An archive member that would land outside the extraction folder; the message names it."""


def member_path(member: zipfile.ZipInfo, target: Path) -> Path | None:
    """Where a zip member goes under ``target``, None for folders and macOS/dot files; refuses
    absolute paths, drive letters, ``..`` and symbolic links (zip-slip), naming the member."""
    name = member.filename
    if (member.external_attr >> 16) & 0o170000 == stat.S_IFLNK:
        raise UnsafeArchiveError(f"refusing archive member {name!r}: it is a symbolic link")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or (pure.parts and ":" in pure.parts[0]):
        raise UnsafeArchiveError(f"refusing archive member {name!r}: absolute path")
    if ".." in pure.parts:
        raise UnsafeArchiveError(
            f"refusing archive member {name!r}: it climbs out of the folder with '..'"
        )
    if member.is_dir() or "__MACOSX" in pure.parts or pure.name.startswith("."):
        return None
    out = (target / Path(*pure.parts)).resolve()
    if not out.is_relative_to(target.resolve()):
        raise UnsafeArchiveError(f"refusing archive member {name!r}: it resolves outside {target}")
    return out


def extract_zip(archive_path: str | os.PathLike, target: str | os.PathLike) -> list[Path]:
    """Extract regular files only inside ``target``. Every member is checked before anything is
    written, so an unsafe archive leaves nothing behind."""
    target = Path(target)
    with zipfile.ZipFile(archive_path) as archive:
        plan = [(member, member_path(member, target)) for member in archive.infolist()]
        written = []
        for member, out in plan:
            if out is None:
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            written.append(out)
    return written
