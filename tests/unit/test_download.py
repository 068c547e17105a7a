"""The dataset download path, exercised with file:// URLs built from the real data."""

import hashlib
import stat
import zipfile
from pathlib import Path

import pytest

from mstl.data import covid_ct
from mstl.data.archives import UnsafeArchiveError, extract_zip
from mstl.data.download import COVID_CT_SOURCES, UCSD, ChecksumError, download, fetch_dataset


def test_download_checks_sha256_and_leaves_nothing_on_mismatch(tmp_path):
    src = tmp_path / "file.bin"
    src.write_bytes(b"mstl" * 1000)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    out = download(src.as_uri(), tmp_path / "out" / "file.bin", good)
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(ChecksumError, match="file.bin"):
        download(src.as_uri(), tmp_path / "bad" / "file.bin", "0" * 64)
    assert list((tmp_path / "bad").iterdir()) == []


def mirror_of_covid_ct(data_root, mirror):
    """Lay out the public repository's files (zips, split lists, metadata) from the real data."""
    dataset = data_root / "covid-ct"
    for source in COVID_CT_SOURCES:
        rel = source.url[len(UCSD) + 1 :]
        path = mirror / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".zip":
            folder = path.stem  # CT_COVID or CT_NonCOVID
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
                for image in sorted((dataset / folder).iterdir()):
                    archive.write(image, f"{folder}/{image.name}")
        else:
            path.write_bytes((dataset / source.dest).read_bytes())
    return mirror


@pytest.fixture(scope="module")
def mirror(data_root, tmp_path_factory):
    return mirror_of_covid_ct(data_root, tmp_path_factory.mktemp("mirror"))


def test_fetch_covid_ct_from_a_mirror_gives_a_usable_verified_dataset(mirror, tmp_path):
    target = fetch_dataset("covid-ct", tmp_path, base_url=mirror.as_uri())
    assert not list(target.glob("*.zip"))
    index = covid_ct.load_split(tmp_path, "official")
    assert len(index) == 746


def test_fetch_detects_an_altered_image(mirror, tmp_path):
    altered = tmp_path / "altered"
    altered.mkdir()
    for path in mirror.rglob("*"):
        if path.is_file():
            dest = altered / path.relative_to(mirror)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())
    split_list = altered / "Data-split" / "COVID" / "testCT_COVID.txt"
    split_list.write_text(split_list.read_text() + "\n")
    with pytest.raises(ChecksumError, match="testCT_COVID.txt"):
        fetch_dataset("covid-ct", tmp_path / "data", base_url=altered.as_uri())


def test_unknown_dataset_is_named(tmp_path):
    with pytest.raises(ValueError, match="'lidc'"):
        fetch_dataset("lidc", tmp_path)


def crafted_zip(path, members: dict[str, bytes], symlinks: dict[str, str] = {}):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in symlinks.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


@pytest.mark.parametrize(
    "evil, reason",
    [
        ({"members": {"../evil.txt": b"x"}}, "'..'"),
        ({"members": {"/abs/evil.txt": b"x"}}, "absolute"),
        ({"members": {}, "symlinks": {"CT_COVID/link.png": "/etc/passwd"}}, "symbolic link"),
    ],
)
def test_unsafe_zip_members_are_refused_by_name_and_nothing_is_written(tmp_path, evil, reason):
    target = tmp_path / "data" / "covid-ct"
    archive = crafted_zip(
        tmp_path / "a.zip",
        {"CT_COVID/ok.png": b"fine", **evil["members"]},
        evil.get("symlinks", {}),
    )
    with pytest.raises(UnsafeArchiveError, match=reason) as error:
        extract_zip(archive, target)
    bad = next(iter({**evil["members"], **evil.get("symlinks", {})}))
    assert repr(bad) in str(error.value)
    written = [p for p in tmp_path.rglob("*") if p.name not in ("a.zip",) and p.is_file()]
    assert (
        written == []
    )  # not even the good member: the archive is checked before anything is written
    assert not Path("/abs/evil.txt").exists()


def test_safe_zip_extracts_regular_files_and_skips_macos_metadata(tmp_path):
    archive = crafted_zip(
        tmp_path / "a.zip",
        {"CT_COVID/a.png": b"1", "__MACOSX/CT_COVID/._a.png": b"junk", "CT_COVID/sub/b.png": b"2"},
    )
    written = extract_zip(archive, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in written) == [
        "CT_COVID/a.png",
        "CT_COVID/sub/b.png",
    ]
    assert (tmp_path / "out" / "CT_COVID" / "sub" / "b.png").read_bytes() == b"2"


@pytest.fixture
def http_folder(tmp_path):
    """A folder served over plain HTTP on 127.0.0.1: the path pooch's own downloader takes."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_over_http_gives_the_same_bytes_and_refuses_a_wrong_hash(http_folder, tmp_path):
    folder, base = http_folder
    data = bytes(range(256)) * 5000
    (folder / "archive.zip").write_bytes(data)
    good = hashlib.sha256(data).hexdigest()
    out = download(f"{base}/archive.zip", tmp_path / "out" / "archive.zip", good)
    assert out.read_bytes() == data
    with pytest.raises(ChecksumError, match=f"{base}/archive.zip"):
        download(f"{base}/archive.zip", tmp_path / "bad" / "archive.zip", "f" * 64)
    assert list((tmp_path / "bad").iterdir()) == []


def test_a_file_already_there_is_kept_when_its_hash_matches_and_replaced_otherwise(tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"new bytes")
    digest = hashlib.sha256(b"new bytes").hexdigest()
    dest = tmp_path / "data" / "src.txt"
    download(src.as_uri(), dest, digest)
    src.unlink()  # the source is gone: a matching file is not fetched again
    assert download(src.as_uri(), dest, digest).read_bytes() == b"new bytes"
    src.write_bytes(b"new bytes")
    dest.write_bytes(b"stale")
    assert download(src.as_uri(), dest, digest).read_bytes() == b"new bytes"  # wrong: refetched
    dest.write_bytes(b"stale")
    assert download(src.as_uri(), dest).read_bytes() == b"new bytes"  # no hash: always fetched


def test_a_missing_source_is_named(tmp_path):
    with pytest.raises(OSError, match="nowhere.zip"):
        download((tmp_path / "nowhere.zip").as_uri(), tmp_path / "out" / "nowhere.zip")
    assert list((tmp_path / "out").iterdir()) == []
