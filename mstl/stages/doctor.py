"""`python -m mstl doctor` (and `mlflow run . -e doctor`): what this machine offers a profile, in a
few lines, before hours of training find out. Exits non-zero, with the reasons, when something the
profile needs is missing; warns about what only slows it down (no GPU for the paper's grid)."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import keras
import mlflow
import psutil
import tensorflow as tf

from mstl import defaults, tensorflow_build, unused_gpu_warning
from mstl.data import covid_ct
from mstl.models import BACKBONES, PAPER_BACKBONES
from mstl.stages.cli import parse_params
from mstl.stages.experiment import IQ_OTH_NCCD, PROFILES
from mstl.tracking import tracking_uri

GIB = 1024**3


@dataclass(frozen=True)
class DoctorParams:
    """Parameters of `-e doctor`."""

    profile: str = "cpu"
    data_root: str = defaults.DATA_ROOT

    def validate(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; use one of {', '.join(PROFILES)}")


@dataclass
class Findings:
    """Lines to print, warnings, and the reasons the profile cannot run here."""

    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def software(found: Findings) -> None:
    """Python, the TensorFlow build and what it sees, Keras and its backend."""
    build = tf.sysconfig.get_build_info()
    cuda = f"CUDA {build.get('cuda_version')}" if build.get("is_cuda_build") else "CPU only"
    devices = [d.name.replace("/physical_device:", "") for d in tf.config.list_physical_devices()]
    found.lines += [
        f"python      {platform.python_version()} ({sys.executable})",
        f"tensorflow  {tf.__version__}, package {tensorflow_build()} ({cuda})",
        f"devices     {', '.join(devices)}",
        f"keras       {keras.__version__}, backend {keras.config.backend()}",
    ]
    warning = unused_gpu_warning(tf.config.list_physical_devices("GPU"))
    if warning:
        found.warnings.append(warning.removeprefix("WARNING: "))


def tracking(found: Findings) -> None:
    """The tracking URI in force and whether its store answers."""
    uri = tracking_uri()
    try:
        n = len(mlflow.MlflowClient(uri).search_experiments(max_results=100))
        found.lines.append(f"tracking    {uri}: answers ({n} experiment(s))")
    except Exception as exc:  # a server that is down, a database that refuses: say which and why
        found.lines.append(f"tracking    {uri}: does not answer")
        found.missing.append(
            f"the tracking store {uri} does not answer: {type(exc).__name__}: {exc}"
        )


def data(found: Findings, params: DoctorParams) -> None:
    """COVID-CT always; the cpu profile's Transition stand-in (IQ-OTH/NCCD) for that profile."""
    try:
        n = len(covid_ct.index_images(params.data_root))
        found.lines.append(f"covid-ct    {covid_ct.dataset_dir(params.data_root)}: {n} images")
    except (FileNotFoundError, ValueError) as exc:
        found.lines.append("covid-ct    missing")
        found.missing.append(str(exc))
    if params.profile == "cpu":
        root = Path(params.data_root) / IQ_OTH_NCCD
        n = sum(1 for p in root.rglob("*.jpg")) if root.is_dir() else 0
        found.lines.append(f"transition  {root}: {n} slices" if n else "transition  missing")
        if not n:
            found.missing.append(
                f"the cpu profile's Transition slices are not under {root} (IQ-OTH/NCCD); "
                "or pass transition_dicom_root / transition_slices_root to the grid"
            )
    else:
        found.lines.append("transition  given to the grid (transition_dicom_root=...)")


def weights(found: Findings, params: DoctorParams) -> None:
    """The profile's backbones' ImageNet files in the Keras cache (else Keras downloads them on
    first use: a warning, since an offline machine then fails there)."""
    names = PAPER_BACKBONES + ("inceptionv3",) if params.profile == "paper" else ("mobilenet_025",)
    folder = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models"  # get_file's
    cached = {p.name for p in folder.glob("*.h5")} if folder.is_dir() else set()
    have = [n for n in names if BACKBONES[n].keras_weights_file in cached]
    lacking = [n for n in names if n not in have]
    found.lines.append(f"weights     {folder}: {len(have)} of {len(names)} cached")
    if lacking:
        found.warnings.append(
            f"ImageNet weights not cached for {', '.join(lacking)}: Keras downloads them on first "
            "use (offline, seed the cache first: docs/getting-started.md)"
        )


def resources(found: Findings, params: DoctorParams) -> None:
    """Free memory and disk; the paper's grid without a GPU takes days."""
    memory = psutil.virtual_memory()
    disk = shutil.disk_usage(Path.cwd())
    found.lines.append(
        f"memory      {memory.available / GIB:.1f} GiB free of {memory.total / GIB:.1f} GiB; "
        f"disk {disk.free / GIB:.1f} GiB free here"
    )
    if params.profile == "paper" and not tf.config.list_physical_devices("GPU"):
        found.warnings.append("profile paper without a GPU: its grid takes days on a CPU")


def examine(params: DoctorParams) -> Findings:
    """Every check, in the order they are printed."""
    params.validate()
    found = Findings()
    for check in (software, tracking):
        check(found)
    for check in (data, weights, resources):
        check(found, params)
    return found


def main(argv: list[str] | None = None) -> None:
    """The command line of `python -m mstl doctor` and of the entry point."""
    sys.exit(run_doctor(parse_params(DoctorParams, argv)))


def run_doctor(params: DoctorParams) -> int:
    """Print the findings; 1 when the profile cannot run here, with the reasons, else 0."""
    found = examine(params)
    print(f"mstl doctor (profile {params.profile})")
    print("\n".join(f"  {line}" for line in found.lines))
    for warning in found.warnings:
        print(f"warning: {warning}")
    for reason in found.missing:
        print(f"missing: {reason}")
    print("ready" if not found.missing else f"not ready: {len(found.missing)} thing(s) missing")
    return 1 if found.missing else 0
