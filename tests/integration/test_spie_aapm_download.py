"""The LUNGx download against a fake NBIA server serving re-labelled real DICOM files: killed with
SIGKILL mid-download then run again, it resumes without fetching a verified series twice; and how
fast it goes (the client's own cost: the server is local)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from mlflow import MlflowClient

from mstl.data import nbia, spie_aapm
from tests.conftest import DATA_ROOT, REPO, need_shared, run_entry_point
from tests.fake_nbia import FakeNbia, make_series, metadata_rows

pytestmark = pytest.mark.integration

PATIENTS = ["CT-Training-BE001", "CT-Training-LC001", "LUNGx-CT001"]
CHILD = (
    "import sys\n"
    "from mstl.data.nbia import Retry\n"
    "from mstl.data.spie_aapm import download_collection\n"
    "download_collection(sys.argv[1], sys.argv[2], retry=Retry(attempts=2, delay=0.1))\n"
)


@pytest.fixture(scope="module")
def real_series():
    shared = need_shared(DATA_ROOT / "lung-pet-ct-dx")
    templates = sorted(shared.rglob("*.dcm"))  # 60 files of 527 KB, two series
    rows = metadata_rows(
        need_shared(DATA_ROOT / "spie-aapm" / "nbia_download_metadata.csv"), PATIENTS
    )
    return templates, rows


def markers(dest):
    return sorted(p.parent.name for p in dest.glob(f"*/*/{nbia.MARKER}"))


def wait_for(condition, timeout: float, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the download ended (rc {proc.returncode}) before it could be killed")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"nothing verified within {timeout} s")
        time.sleep(0.05)


def test_sigkill_mid_download_then_rerun_resumes(tmp_path, real_series):
    templates, rows = real_series
    series = make_series(rows, templates[:6], 6)  # 3 series of 6 slices, about 3.2 MB each
    dest = tmp_path / "lungx"
    # ~0.1 s per 256 KB chunk: each series takes over a second, so the kill lands mid-series
    with FakeNbia(series, delay=0.1) as fake:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(dest), fake.base_url],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: len(markers(dest)) >= 1, 120, proc)
            # the next series is on its way: wait for its first bytes, then kill
            wait_for(lambda: any((dest / nbia.PARTIAL).glob("*/series.zip")), 30, proc)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(30)
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        verified = markers(dest)
        assert 1 <= len(verified) < 3 and any((dest / nbia.PARTIAL).iterdir())
        requests_before = {s.series_uid: fake.image_requests(s.series_uid) for s in series}

        fake.delay = 0.0
        messages = []
        summary = spie_aapm.download_collection(dest, fake.base_url, progress=messages.append)
        for s in series:
            again = fake.image_requests(s.series_uid) - requests_before[s.series_uid]
            assert again == (0 if s.series_uid in verified else 1), s.patient_id
    assert (summary.skipped, summary.downloaded, summary.failed) == (
        len(verified),
        3 - len(verified),
        [],
    )
    check = nbia.check_tree(dest)
    assert (check.series, check.files, check.problems) == (3, 18, [])
    assert not (dest / nbia.PARTIAL).exists()
    assert sum("already verified" in m for m in messages) >= len(verified)


def test_throughput_against_the_fake_server(tmp_path, real_series):
    templates, rows = real_series
    series = make_series(rows[:2], templates, 30)  # 2 series x 30 slices x 527 KB: ~32 MB
    with FakeNbia(series, chunk=1 << 20) as fake:
        summary = spie_aapm.download_collection(tmp_path, fake.base_url, progress=lambda m: None)
    assert summary.downloaded == 2 and nbia.check_tree(tmp_path, full=False).problems == []
    print(
        f"\nNBIA download from a local fake server: {summary.bytes / 1e6:.1f} MB in "
        f"{summary.seconds:.2f} s = {summary.mb_per_s:.1f} MB/s (fetch, extract, verify, install)"
    )
    assert summary.mb_per_s > 2  # far below the measured rate: catches a pathological slowdown


def test_the_download_command_then_nodule_slices_through_mlflow_run(
    tmp_path, real_series, mlflow_server
):
    """What a user types: `python -m mstl.data.download spie-aapm` against the (fake) NBIA API with
    TCIA's real truth spreadsheets, then `mlflow run . -e prepare_transition` with the nodule
    selection; the prepare run is read back from the tracking server."""
    templates, rows = real_series
    chosen = [r for r in rows if r[0] in ("CT-Training-BE001", "CT-Training-LC001")]
    series = make_series(chosen, templates[:8], 8)
    data = tmp_path / "data"
    with FakeNbia(series) as fake:
        cmd = [sys.executable, "-m", "mstl.data.download", "spie-aapm", "--dest", str(data),
               "--base-url", fake.base_url, "--patients", "CT-Training-BE001,CT-Training-LC001",
               "--truth", str(DATA_ROOT / "spie-aapm")]  # fmt: skip
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 series downloaded" in done.stdout and "labels in" in done.stdout
    root = data / "spie-aapm"
    labels = pd.read_csv(root / "labels.csv")
    assert dict(zip(labels["patient_id"], labels["label"], strict=True)) == {
        "CT-Training-BE001": 0,
        "CT-Training-LC001": 1,
    }
    nodules = pd.read_csv(root / "nodules.csv").dropna(subset=["series_instance_uid"])
    assert len(nodules) == 2  # the calibration set: one nodule per scan
    # the fake series hold 8 of a scan's slices, InstanceNumber 1-8: the centres move to slice 4
    nodules.assign(slice=4).to_csv(tmp_path / "nodules-on-the-fake-series.csv", index=False)
    params = {
        "dicom_root": root,
        "labels_csv": root / "labels.csv",
        "nodules_csv": tmp_path / "nodules-on-the-fake-series.csv",
        "selection": "nodule",
        "nodule_mm": 1000.0,  # every slice of these short series is within reach
        "export_dir": tmp_path / "exports",
    }
    result = run_entry_point("prepare_transition", params, mlflow_server, "spie-aapm")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("spie-aapm").experiment_id],
        "tags.stage = 'prepare_transition'",
    )
    assert run.data.params["selection"] == "nodule" and run.data.metrics["n_series"] == 2
    manifest = pd.read_csv(
        client.download_artifacts(run.info.run_id, "manifest.csv", str(tmp_path))
    )
    assert set(manifest["selection"]) == {"nodule"} and len(manifest) == 16
    by_patient = manifest.groupby("patient_id")["label"].unique()
    assert list(by_patient["CT-Training-BE001"]) == [0] and list(
        by_patient["CT-Training-LC001"]
    ) == [1]
