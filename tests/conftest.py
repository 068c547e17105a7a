"""Shared fixtures: the real ../shared data, a seeded Keras cache, and a real `mlflow server`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MSTL_SHARED") or REPO.parent / "shared").resolve()
DATA_ROOT = SHARED / "data"
VENV_BIN = Path(sys.executable).parent

# Keras reads KERAS_HOME when it is imported: point it at the project cache before any test imports
# it.
os.environ.setdefault("KERAS_HOME", str(REPO / ".cache" / "keras"))


# Unit tests need neither ../shared nor a trained network: a test that reaches for ../shared must be
# marked integration (tests using these fixtures are marked automatically), or need_shared fails it.
INTEGRATION_FIXTURES = {"data_root", "keras_home", "mlflow_server", "postgres_uri"}
_current = {"integration": True}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def pytest_runtest_setup(item):
    _current["integration"] = item.get_closest_marker("integration") is not None


def need_shared(path: Path) -> Path:
    if not _current["integration"]:
        pytest.fail(
            f"a unit test reached for {path}: tests that use ../shared are marked integration"
        )
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must have ../shared beside the clone")
        pytest.skip(f"{path} not found (tests use the real data in ../shared)")
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    return need_shared(DATA_ROOT / "covid-ct").parent


@pytest.fixture(scope="session")
def keras_home() -> Path:
    """A Keras cache holding MobileNet-0.25's ImageNet file, fetched through Keras's own
    get_file."""
    weights = need_shared(SHARED / "weights")
    from mstl.models import prefetch_imagenet_weights

    cache = Path(os.environ["KERAS_HOME"])
    prefetch_imagenet_weights("mobilenet_025", base_url=weights.as_uri(), cache_dir=str(cache))
    return cache


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend in a temp folder."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - the server writes to it until the session ends
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(
                f"mlflow server did not start; log:\n{(root / 'server.log').read_text()[-3000:]}"
            )
        time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


MLFLOW_RUN_STATE = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def run_entry_point(
    entry: str, params: dict, tracking_uri: str, experiment: str, timeout: int = 900
):
    """`mlflow run . -e ENTRY --env-manager local` in the repo, as a user would type it."""
    cmd = [
        str(VENV_BIN / "mlflow"),
        "run",
        str(REPO),
        "-e",
        entry,
        "--env-manager",
        "local",
        "--experiment-name",
        experiment,
    ]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    env = child_env(
        MLFLOW_TRACKING_URI=tracking_uri, PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"
    )
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a process a test starts: this one's, without the MLflow run state that
    in-process runs leave behind (mlflow.set_experiment exports the experiment's ID), and
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_RUN_STATE}
    return {**env, **extra}


@pytest.fixture
def local_tracking(tmp_path, monkeypatch) -> str:
    """An embedded sqlite store in a temp folder, for in-process stage runs."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    import mlflow

    mlflow.set_tracking_uri(uri)
    # mlflow.set_experiment's choice outlives the store it was made in: each test starts afresh
    mlflow.tracking.fluent._active_experiment_id = None
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.tracking.fluent._active_experiment_id = None
    for leaked in MLFLOW_RUN_STATE:  # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID
        os.environ.pop(leaked, None)


def copy_or_link_tree(src: Path, dst: Path) -> None:
    """A writable twin of a read-only tree: folders copied, files symlinked."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path, target)


def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program from PATH or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


@pytest.fixture(scope="session")
def postgres_uri(tmp_path_factory) -> str:
    """A real PostgreSQL server on 127.0.0.1 (Debian's postgresql; .ci/run installs it), database
    mlflow."""
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        if os.environ.get("CI"):
            pytest.fail(
                "PostgreSQL server programs not found: .ci/run installs Debian's postgresql"
            )
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    import tempfile

    # not under pytest's tmp folder: that is private to root, and the server runs as user postgres
    root = Path(tempfile.mkdtemp(prefix="mstl-postgres-"))
    data = root / "data"
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
        os.chmod(root, 0o700)
    port = free_port()

    def run(*cmd):
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True)
        if done.returncode:
            pytest.fail(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")

    run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust")
    run(
        pg_ctl,
        "-D",
        str(data),
        "-l",
        str(root / "server.log"),
        "-w",
        "start",
        "-o",
        f"-h 127.0.0.1 -p {port} -k {root}",
    )
    try:
        run(
            postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"
        )
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)
