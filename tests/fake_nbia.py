"""A fake NBIA v4 server on 127.0.0.1 (stdlib http.server in a thread, port 0) for the download
tests. getSeries answers from a few series; getImage and getImageWithMD5Hash build a zip like
TCIA's (a LICENSE entry, then 00000001.dcm, ...) of real DICOM files re-labelled to each series'
PatientID, StudyInstanceUID and SeriesInstanceUID, so the client's verification is real. Faults are
switched on per series and last ``times`` requests (then the series is served correctly)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import stat
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pydicom
from pydicom.uid import generate_uid

COLLECTION = "SPIE-AAPM Lung CT Challenge"
LICENSE = b"Fake TCIA licence text for tests.\n"
FAULTS = (
    "http500",  # HTTP 500 before any byte
    "truncated",  # a complete HTTP answer holding the first half of the zip
    "drop",  # Content-Length of the whole zip, half of it sent, connection closed
    "stall",  # nothing for ``stall`` seconds before the answer (a read timeout)
    "short",  # one DICOM file left out while getSeries still lists them all
    "wrong-series",  # one DICOM file of another SeriesInstanceUID
    "traversal",  # a member named ../escaped.dcm
    "absolute",  # a member named /tmp/absolute.dcm
    "symlink",  # a member that is a symbolic link
    "bad-md5",  # md5hashes.csv with a wrong hash (getImageWithMD5Hash only)
)
# Three series of the real collection, copied from nbia_download_metadata.csv, so unit tests need
# no ../shared: (Subject ID, Study UID, Series UID)
UNIT_ROWS = (
    (
        "CT-Training-LC001",
        "1.2.840.113704.1.111.9856.1167872600.1",
        "1.2.840.113704.1.111.9856.1167873858.28",
    ),
    (
        "LUNGx-CT001",
        "1.3.50463009827345485762745999238237348347135062081",
        "1.3.563871217806014917027594443208961765673833569714",
    ),
    (
        "LUNGx-CT005",
        "1.3.1442609115120659987998337817462455663277129177526",
        "1.3.1116960423752885364938337008917338367230862940794",
    ),
)


@dataclass
class FakeSeries:
    patient_id: str
    study_uid: str
    series_uid: str
    files: dict[str, bytes]  # member name -> DICOM bytes

    def row(self) -> dict:
        """A getSeries row as NBIA v4 writes it (null fields left out)."""
        return {
            "SeriesInstanceUID": self.series_uid,
            "StudyInstanceUID": self.study_uid,
            "PatientID": self.patient_id,
            "Collection": COLLECTION,
            "Modality": "CT",
            "ImageCount": len(self.files),
            "FileSize": sum(len(b) for b in self.files.values()),
        }


@dataclass
class Fault:
    kind: str
    times: int = 1_000_000  # requests affected before the series is served correctly

    def __post_init__(self):
        if self.kind not in FAULTS:
            raise ValueError(f"unknown fault {self.kind!r}; known: {FAULTS}")


def relabel(template: bytes | Path, series: tuple[str, str, str], index: int) -> bytes:
    """A copy of a DICOM file as slice ``index`` of (patient, study, series)."""
    source = io.BytesIO(template) if isinstance(template, bytes) else template
    ds = pydicom.dcmread(source)
    patient, study, series_uid = series
    sop = generate_uid(entropy_srcs=[series_uid, str(index)])
    ds.PatientID = ds.PatientName = patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.InstanceNumber = index + 1
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def make_series(
    rows: list[tuple[str, str, str]], templates: list[Path], per_series: int
) -> list[FakeSeries]:
    """``per_series`` slices for each (patient, study, series) row, cycling over ``templates``."""
    cache = {p: p.read_bytes() for p in templates}
    out = []
    for row in rows:
        files = {}
        for i in range(per_series):
            files[f"{i + 1:08d}.dcm"] = relabel(cache[templates[i % len(templates)]], row, i)
        out.append(FakeSeries(*row, files))
    return out


def metadata_rows(csv_path: Path, patients: list[str]) -> list[tuple[str, str, str]]:
    """(Subject ID, Study UID, Series UID) of ``patients`` from an NBIA metadata.csv."""
    with open(csv_path, newline="") as f:
        rows = {r["Subject ID"]: r for r in csv.DictReader(f)}
    return [(p, rows[p]["Study UID"], rows[p]["Series UID"]) for p in patients]


def symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def build_zip(series: FakeSeries, md5: bool, fault: str | None) -> bytes:
    """The zip NBIA would send, with ``fault`` applied to its content."""
    files = dict(series.files)
    if fault == "short":
        files.pop(sorted(files)[-1])
    if fault == "wrong-series":
        name = sorted(files)[0]
        files[name] = relabel(files[name], ("X", "1.2.3", "1.2.3.999"), 0)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("LICENSE", LICENSE)
        for name, data in sorted(files.items()):
            zf.writestr(name, data)
        extra = {"traversal": "../escaped.dcm", "absolute": "/tmp/absolute.dcm"}
        if fault in extra:
            zf.writestr(extra[fault], next(iter(files.values())))
        if fault == "symlink":
            zf.writestr(symlink_info("link.dcm"), "/etc/passwd")
        if md5:
            hashes = {n: hashlib.md5(d).hexdigest() for n, d in files.items()}
            if fault == "bad-md5":
                hashes[sorted(hashes)[0]] = "0" * 32
            zf.writestr(
                "md5hashes.csv",
                "".join(
                    f"{n},{h}\n" for n, h in [("fileName", "md5hash"), *sorted(hashes.items())]
                ),
            )
    return out.getvalue()


@dataclass
class FakeNbia:
    """The server; ``requests`` counts (endpoint, series or collection) pairs it answered."""

    series: list[FakeSeries]
    faults: dict[str, Fault] = field(default_factory=dict)
    delay: float = 0.0  # seconds between chunks of a zip (a slow server)
    chunk: int = 256 * 1024
    stall: float = 1.0
    requests: Counter = field(default_factory=Counter)
    extra_rows: list[dict] = field(default_factory=list)  # raw getSeries rows added as they are

    def __post_init__(self):
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/nbia-api/services/v4"

    def image_requests(self, series_uid: str) -> int:
        with self.lock:
            return sum(
                n
                for (ep, key), n in self.requests.items()
                if key == series_uid and ep != "getSeries"
            )

    def count(self, endpoint: str, key: str) -> int:
        """Record a request; returns how many of its kind came before it (1 for the first)."""
        with self.lock:
            self.requests[endpoint, key] += 1
            return self.requests[endpoint, key]

    def fault_for(self, series_uid: str, nth: int) -> str | None:
        fault = self.faults.get(series_uid)
        return fault.kind if fault and nth <= fault.times else None

    def start(self) -> FakeNbia:
        fake = self

        class Handler(FakeHandler):
            server_fake = fake

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def __enter__(self) -> FakeNbia:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class FakeHandler(BaseHTTPRequestHandler):
    server_fake: FakeNbia
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        endpoint = url.path.rsplit("/", 1)[-1]
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            if endpoint == "getSeries":
                self.get_series(query.get("Collection", ""))
            elif endpoint in ("getImage", "getImageWithMD5Hash"):
                self.get_image(endpoint, query.get("SeriesInstanceUID", ""))
            else:
                self.send_error(404, f"unknown endpoint {endpoint}")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (killed): nothing to answer

    def send_body(self, body: bytes, content_type: str, length: int | None = None) -> None:
        fake = self.server_fake
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        for start in range(0, len(body), fake.chunk):
            self.wfile.write(body[start : start + fake.chunk])
            self.wfile.flush()
            if fake.delay:
                time.sleep(fake.delay)

    def get_series(self, collection: str) -> None:
        fake = self.server_fake
        fake.count("getSeries", collection)
        rows = [s.row() for s in fake.series] + fake.extra_rows if collection == COLLECTION else []
        body = json.dumps(rows).encode() if rows else b""  # no match: 200 with an empty body
        self.send_body(body, "application/json")

    def get_image(self, endpoint: str, series_uid: str) -> None:
        fake = self.server_fake
        nth = fake.count(endpoint, series_uid)
        match = [s for s in fake.series if s.series_uid == series_uid]
        if not match:
            self.send_error(404, f"no series {series_uid}")
            return
        fault = fake.fault_for(series_uid, nth)
        if fault == "http500":
            self.send_error(500, "fake internal error")
            return
        if fault == "stall":
            time.sleep(fake.stall)
        body = build_zip(match[0], endpoint == "getImageWithMD5Hash", fault)
        if fault == "truncated":
            body = body[: len(body) // 2]
        if fault == "drop":
            self.send_body(body[: len(body) // 2], "application/zip", length=len(body))
            self.close_connection = True
            return
        self.send_body(body, "application/zip")
