"""The NBIA client against a fake server on 127.0.0.1: progress, resume, faults, unsafe zips.

Unit tests serve small synthetic DICOM slices re-labelled to three real LUNGx series; one test,
marked integration, serves re-labelled slices of the real Lung-PET-CT-Dx files in ../shared."""

from __future__ import annotations

import csv
import json
import re
import shutil
import zipfile

import pydicom
import pytest

from mstl.data import nbia, spie_aapm
from tests.conftest import DATA_ROOT, need_shared
from tests.dicom_factory import write_slice
from tests.fake_nbia import UNIT_ROWS, FakeNbia, Fault, make_series, metadata_rows

PER_SERIES = 3


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    folder = tmp_path_factory.mktemp("templates")
    return [write_slice(folder / f"t{i}.dcm", "1.2.3", z=5.0 * i, instance=i) for i in range(3)]


@pytest.fixture(scope="module")
def fake_series(templates):
    return make_series(UNIT_ROWS, templates, PER_SERIES)


@pytest.fixture
def server(fake_series):
    with FakeNbia(list(fake_series)) as fake:
        yield fake


@pytest.fixture
def sleeps():
    return []


@pytest.fixture
def retry(sleeps):
    return nbia.Retry(attempts=3, delay=0.5, timeout=5.0, sleep=sleeps.append)


def run(server, dest, retry, **kwargs):
    messages = []
    summary = spie_aapm.download_collection(
        dest, server.base_url, progress=messages.append, retry=retry, **kwargs
    )
    return summary, messages


def uid(i: int) -> str:
    return UNIT_ROWS[i][2]


def test_happy_path_downloads_verifies_and_reports_progress(server, tmp_path, retry):
    summary, messages = run(server, tmp_path, retry)
    assert (summary.series, summary.downloaded, summary.skipped, summary.failed) == (3, 3, 0, [])
    assert summary.bytes > 0 and summary.mb_per_s > 0
    for patient, _, series_uid in UNIT_ROWS:
        folder = tmp_path / patient / series_uid
        dicom = sorted(folder.glob("*.dcm"))
        assert len(dicom) == PER_SERIES and (folder / "LICENSE").is_file()
        ds = pydicom.dcmread(dicom[0], stop_before_pixels=True)
        assert (ds.PatientID, ds.SeriesInstanceUID) == (patient, series_uid)
        marker = json.loads((folder / nbia.MARKER).read_text())
        assert marker["image_count"] == PER_SERIES and marker["other"] == ["LICENSE"]
    assert any("[1/3]" in m and "MB" in m and "verified" in m for m in messages)
    assert any("[3/3]" in m and "3/3 series done" in m for m in messages)
    assert "3 series downloaded" in messages[-1]
    with open(tmp_path / nbia.SERIES_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [r["verified"] for r in rows] == ["true"] * 3
    assert not (tmp_path / nbia.PARTIAL).exists()
    check = nbia.check_tree(tmp_path)
    assert (check.series, check.files, check.problems) == (3, 9, [])


def test_second_run_downloads_nothing_verified(server, tmp_path, retry):
    run(server, tmp_path, retry)
    before = {uid(i): server.image_requests(uid(i)) for i in range(3)}
    listing = (tmp_path / nbia.SERIES_CSV).read_bytes()
    summary, messages = run(server, tmp_path, retry)
    assert (summary.downloaded, summary.skipped, summary.bytes) == (0, 3, 0)
    assert (
        {uid(i): server.image_requests(uid(i)) for i in range(3)}
        == before
        == {uid(i): 1 for i in range(3)}
    )
    assert sum("already verified, skipped" in m for m in messages) == 3
    assert (tmp_path / nbia.SERIES_CSV).read_bytes() == listing  # no time stamps: same bytes


def test_patients_limits_the_download(server, tmp_path, retry):
    summary, _ = run(server, tmp_path, retry, patients=[" lungx-ct005 "])
    assert (summary.series, summary.downloaded) == (1, 1)
    assert server.image_requests(uid(2)) == 1 and server.image_requests(uid(0)) == 0
    with pytest.raises(nbia.NbiaError, match="LUNGX-CT999"):
        run(server, tmp_path, retry, patients=["LUNGx-CT999"])


def test_half_written_series_is_fetched_again(server, tmp_path, retry, fake_series):
    run(server, tmp_path, retry)
    unmarked = tmp_path / UNIT_ROWS[0][0] / uid(0)
    (unmarked / nbia.MARKER).unlink()  # renamed in but never verified: not trusted
    shortened = tmp_path / UNIT_ROWS[1][0] / uid(1) / "00000002.dcm"
    shortened.write_bytes(shortened.read_bytes()[:100])  # a file cut short after verification
    leftover = tmp_path / nbia.PARTIAL / uid(2) / "files"
    leftover.mkdir(parents=True)
    (leftover / "00000001.dcm").write_bytes(b"half")  # an interrupted run's work: deleted
    summary, messages = run(server, tmp_path, retry)
    assert (summary.downloaded, summary.skipped) == (2, 1)
    assert [server.image_requests(uid(i)) for i in range(3)] == [2, 2, 1]
    assert any("no verification marker" in m for m in messages)
    assert any("00000002.dcm is missing or has changed size" in m for m in messages)
    assert shortened.read_bytes() == fake_series[1].files["00000002.dcm"]
    assert nbia.check_tree(tmp_path).problems == []
    assert not (tmp_path / nbia.PARTIAL).exists()


def test_check_tree_finds_changed_bytes(server, tmp_path, retry):
    run(server, tmp_path, retry)
    path = tmp_path / UNIT_ROWS[0][0] / uid(0) / "00000001.dcm"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other pixel: only the full check sees it
    path.write_bytes(bytes(data))
    assert nbia.check_tree(tmp_path, full=False).problems == []
    problems = nbia.check_tree(tmp_path).problems
    assert len(problems) == 1 and "00000001.dcm" in problems[0]


@pytest.mark.parametrize("kind", ["http500", "truncated", "drop"])
def test_transient_fault_recovers_with_backoff(server, tmp_path, retry, sleeps, kind):
    server.faults[uid(1)] = Fault(kind, times=2)
    summary, messages = run(server, tmp_path, retry)
    assert (summary.downloaded, summary.failed) == (3, [])
    assert server.image_requests(uid(1)) == 3
    assert sleeps == [0.5, 1.0]  # exponential backoff
    assert sum(f"series {uid(1)}" in m and "retry" in m for m in messages) == 2


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("http500", "HTTP 500"),
        ("truncated", "not a valid zip"),
        ("drop", "IncompleteRead|connection closed"),
    ],
)
def test_persistent_fault_names_series_url_and_reason(server, tmp_path, retry, kind, reason):
    server.faults[uid(1)] = Fault(kind)
    with pytest.raises(nbia.DownloadFailed) as caught:
        run(server, tmp_path, retry)
    (error,) = caught.value.summary.failed
    assert error.series == uid(1)
    assert error.url == f"{server.base_url}/getImage?SeriesInstanceUID={uid(1)}"
    assert "gave up after 3 attempts" in error.reason
    assert error.url in str(caught.value) and uid(1) in str(caught.value)
    assert re.search(reason, error.reason)
    assert server.image_requests(uid(1)) == 3
    assert caught.value.summary.downloaded == 2  # the others were still fetched
    assert not (tmp_path / UNIT_ROWS[1][0] / uid(1)).exists()
    assert not (tmp_path / nbia.PARTIAL).exists()


def test_read_timeout_is_retried(server, tmp_path, sleeps):
    server.faults[uid(0)] = Fault("stall", times=1)
    server.stall = 1.0
    retry = nbia.Retry(attempts=2, delay=0.1, timeout=0.3, sleep=sleeps.append)
    summary, messages = run(server, tmp_path, retry)
    assert summary.downloaded == 3 and server.image_requests(uid(0)) == 2
    assert any("timed out" in m.lower() for m in messages)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("short", "2 DICOM files, but getSeries lists ImageCount 3"),
        ("wrong-series", "00000001.dcm belongs to series '1.2.3.999', not this one"),
    ],
)
def test_verification_failure_is_not_retried(server, tmp_path, retry, kind, reason):
    server.faults[uid(2)] = Fault(kind)
    with pytest.raises(nbia.DownloadFailed) as caught:
        run(server, tmp_path, retry)
    (error,) = caught.value.summary.failed
    assert isinstance(error.__cause__, nbia.VerificationError)
    assert error.series == uid(2) and reason in error.reason and "getImage?" in str(error)
    assert server.image_requests(uid(2)) == 1
    assert not (tmp_path / UNIT_ROWS[2][0] / uid(2)).exists()


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("traversal", "'../escaped.dcm': it climbs out"),
        ("absolute", "'/tmp/absolute.dcm': absolute path"),
        ("symlink", "'link.dcm': it is a symbolic link"),
    ],
)
def test_unsafe_zip_is_refused_before_writing(server, tmp_path, retry, kind, reason):
    server.faults[uid(0)] = Fault(kind)
    dest = tmp_path / "dest"
    with pytest.raises(nbia.DownloadFailed) as caught:
        run(server, dest, retry)
    (error,) = caught.value.summary.failed
    assert isinstance(error.__cause__, nbia.UnsafeArchiveError) and reason in error.reason
    assert server.image_requests(uid(0)) == 1
    assert not (tmp_path / "escaped.dcm").exists() and not (dest / "escaped.dcm").exists()
    assert not (dest / UNIT_ROWS[0][0]).exists()


def test_extract_refuses_traversal_and_writes_nothing(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.dcm", b"fine")
        zf.writestr("sub/../../up.dcm", b"evil")
    with pytest.raises(nbia.UnsafeArchiveError, match="up.dcm"):
        nbia.extract_zip_safely(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == [] and not (tmp_path / "up.dcm").exists()


def test_md5_member_is_checked(server, tmp_path, retry):
    summary, _ = run(server, tmp_path / "ok", retry, endpoint="getImageWithMD5Hash")
    assert summary.downloaded == 3
    marker = json.loads((tmp_path / "ok" / UNIT_ROWS[0][0] / uid(0) / nbia.MARKER).read_text())
    assert marker["md5_from_server"] is True and "md5hashes.csv" in marker["other"]
    server.faults[uid(0)] = Fault("bad-md5")
    with pytest.raises(nbia.DownloadFailed) as caught:
        run(server, tmp_path / "bad", retry, endpoint="getImageWithMD5Hash")
    (error,) = caught.value.summary.failed
    assert "MD5 mismatch for 00000001.dcm" in error.reason and "getImageWithMD5Hash?" in error.url


def test_unknown_collection_and_unsafe_listing(server, tmp_path, retry):
    with pytest.raises(nbia.NbiaError, match="no series in collection 'Nope'.*getSeries"):
        nbia.download("Nope", tmp_path, server.base_url, retry=retry, progress=lambda m: None)
    server.extra_rows.append({"SeriesInstanceUID": "1.2.3", "PatientID": "../x", "ImageCount": 1})
    with pytest.raises(nbia.NbiaError, match=r"PatientID '\.\./x' .* unsafe"):
        run(server, tmp_path, retry)


def test_listing_server_error_is_retried_then_named(tmp_path, sleeps):
    with FakeNbia([]) as fake:
        url = fake.base_url
    retry = nbia.Retry(attempts=2, delay=0.1, timeout=1.0, sleep=sleeps.append)
    with pytest.raises(nbia.TransientError, match="connection failed.*2 attempts.*getSeries"):
        nbia.list_series(spie_aapm.COLLECTION, url, retry)  # the server is gone: refused
    assert sleeps == [0.1]


@pytest.mark.integration  # the real ../shared data
def test_real_dicom_relabelled(tmp_path, retry):
    shared = need_shared(DATA_ROOT / "lung-pet-ct-dx")
    templates = sorted(shared.rglob("*.dcm"))[:4]
    rows = metadata_rows(
        need_shared(DATA_ROOT / "spie-aapm" / "nbia_download_metadata.csv"),
        ["CT-Training-BE001", "LUNGx-CT002"],
    )
    with FakeNbia(make_series(rows, templates, 4)) as fake:
        summary, _ = run(fake, tmp_path, retry)
    assert summary.downloaded == 2 and nbia.check_tree(tmp_path).problems == []
    ds = pydicom.dcmread(next((tmp_path / "LUNGx-CT002").rglob("00000001.dcm")))
    assert ds.PatientID == "LUNGx-CT002" and ds.Rows == 512
    shutil.rmtree(tmp_path / "LUNGx-CT002")
    assert nbia.check_tree(tmp_path).series == 1


def test_a_second_run_into_the_same_folder_is_refused(server, tmp_path, retry):
    fcntl = pytest.importorskip("fcntl")
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / nbia.LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(nbia.NbiaError, match="another download is running"):
            run(server, tmp_path, retry)
    assert run(server, tmp_path, retry)[0].downloaded == 3
