"""Real download paths for the public datasets: fetch over any URL (https through pooch, or
file:// in tests), check SHA-256, extract, and verify every extracted file against the checksums
shipped here.

COVID-CT's archives carry no published hash, so the check is per file: the bytes of each image,
split list and metadata file must equal the original release (``checksums/covid-ct.sha256``).
"""

from __future__ import annotations

import argparse
import logging
import os
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pooch
from tqdm.auto import tqdm

from mstl.array_cache import sha256_file
from mstl.data import nbia, spie_aapm
from mstl.data.archives import extract_zip

UCSD = "https://github.com/UCSD-AI4H/COVID-CT/raw/master"


@dataclass(frozen=True)
class Source:
    url: str
    dest: str  # path under the dataset folder; a .zip is extracted there and removed
    sha256: str | None = None


COVID_CT_SOURCES = (
    Source(f"{UCSD}/Images-processed/CT_COVID.zip", "CT_COVID.zip"),
    Source(f"{UCSD}/Images-processed/CT_NonCOVID.zip", "CT_NonCOVID.zip"),
    *(
        Source(f"{UCSD}/Data-split/{cls}/{part}CT_{cls}.txt", f"splits/{cls}/{part}CT_{cls}.txt")
        for cls in ("COVID", "NonCOVID")
        for part in ("train", "val", "test")
    ),
    Source(f"{UCSD}/COVID-CT-MetaInfo.xlsx", "meta/COVID-CT-MetaInfo.xlsx"),
    Source(f"{UCSD}/NonCOVID-CT-MetaInfo.csv", "meta/NonCOVID-CT-MetaInfo.csv"),
)
DATASETS = {"covid-ct": (COVID_CT_SOURCES, "covid-ct.sha256")}


class ChecksumError(ValueError):
    """Downloaded or extracted bytes differ from the expected SHA-256; the message names the
    file."""


def copy_url(url: str, output_file: str, pooch_instance=None) -> None:
    """pooch's downloader for the scheme it has none (``file://``: a mirror on disk, the tests):
    urllib streams the bytes; pooch still owns the temporary file, the hash check and the rename."""
    with urllib.request.urlopen(url) as response, open(output_file, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        name = PurePosixPath(urlsplit(url).path).name
        with tqdm(total=total, unit="B", unit_scale=True, desc=name, mininterval=2) as bar:
            while block := response.read(1 << 20):
                out.write(block)
                bar.update(len(block))


@contextmanager
def quiet_pooch():
    """Mute pooch's advice to pin the hash of a file that has none published (the archives):
    their contents are checked file by file after extraction instead."""
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def download(url: str, dest: str | os.PathLike, sha256: str | None = None) -> Path:
    """Fetch ``url`` to ``dest`` with ``pooch.retrieve``: streamed to a temporary file beside it,
    checked, then renamed, so a mismatch (ChecksumError naming the URL) leaves nothing behind.
    A ``dest`` already holding the expected bytes is kept; one with no hash to check is fetched
    afresh."""
    dest = Path(dest)
    if sha256 is None:
        dest.unlink(missing_ok=True)
    local = urlsplit(url).scheme == "file"
    try:
        with quiet_pooch():
            pooch.retrieve(
                url,
                known_hash=f"sha256:{sha256.lower()}" if sha256 else None,
                fname=dest.name,
                path=dest.parent,
                downloader=copy_url if local else None,
                progressbar=True,
            )
    except ValueError as exc:
        if "does not match the known hash" not in str(exc):
            raise
        raise ChecksumError(f"SHA-256 mismatch for {url}: {exc}") from None
    return dest


def read_checksums(name: str) -> dict[str, str]:
    text = resources.files("mstl.data").joinpath("checksums", name).read_text()
    pairs = (line.split(None, 1) for line in text.splitlines() if line.strip())
    return {path.strip().lstrip("*"): digest for digest, path in pairs}


def verify_files(folder: str | os.PathLike, checksums: dict[str, str]) -> int:
    """Check every listed file under ``folder``; raise naming the first missing or altered file."""
    folder = Path(folder)
    for rel, digest in checksums.items():
        path = folder / rel
        if not path.is_file():
            raise ChecksumError(f"missing after download: {path}")
        if sha256_file(path) != digest:
            raise ChecksumError(f"SHA-256 mismatch for {path}: expected {digest}")
    return len(checksums)


def fetch_dataset(name: str, data_root: str | os.PathLike, base_url: str | None = None) -> Path:
    """Download, extract and verify a dataset into ``data_root/<name>``.

    ``base_url`` replaces the public origin (a mirror, or ``file://`` in tests), keeping each
    source's path below it.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    sources, checksum_file = DATASETS[name]
    checksums = read_checksums(checksum_file)
    target = Path(data_root) / name
    for source in sources:
        url = source.url if base_url is None else base_url.rstrip("/") + source.url[len(UCSD) :]
        # a file listed in the checksums is checked as it arrives; an archive, once extracted
        path = download(url, target / source.dest, source.sha256 or checksums.get(source.dest))
        if path.suffix == ".zip":
            extract_zip(path, target)
            path.unlink()
    count = verify_files(target, checksums)
    print(f"{name}: {count} files verified under {target}")
    return target


def fetch_spie_aapm(args: argparse.Namespace) -> Path:
    """The paper's Transition set: the CT series from TCIA's NBIA API into ``dest/spie-aapm``
    (resumable, verified), then, with ``--truth``, the labels and nodule positions beside them."""
    target = Path(args.dest) / "spie-aapm"
    patients = [p.strip() for p in args.patients.split(",") if p.strip()] or None
    summary = spie_aapm.download_collection(
        target, args.base_url or nbia.DEFAULT_BASE_URL, patients
    )
    print(summary.describe())
    if args.truth:
        truth = Path(args.truth)
        labels, nodules = spie_aapm.write_labels(
            truth / spie_aapm.TEST_XLSX,
            truth / spie_aapm.CALIBRATION_XLSX,
            target / nbia.SERIES_CSV,
            target,
            strict=patients is None,  # a partial download has scans without a series
        )
        print(f"spie-aapm: labels in {labels}, nodule positions in {nodules}")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Download and verify a public dataset.")
    parser.add_argument("dataset", choices=sorted([*DATASETS, "spie-aapm"]))
    parser.add_argument("--dest", default="data", help="data_root to download into")
    parser.add_argument("--base-url", default=None, help="mirror replacing the public origin")
    parser.add_argument(
        "--patients", default="", help="spie-aapm: only these scans (comma-separated patient ids)"
    )
    parser.add_argument(
        "--truth", default="", help="spie-aapm: the folder holding TCIA's two truth spreadsheets"
    )
    args = parser.parse_args(argv)
    if args.dataset == "spie-aapm":
        fetch_spie_aapm(args)
    else:
        fetch_dataset(args.dataset, args.dest, args.base_url)


if __name__ == "__main__":
    main()
