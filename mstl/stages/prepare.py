"""The prepare_transition stage: DICOM CT studies (or folders of 2-D slices) in; a manifest of
selected, windowed lung slices with their labels out, exported once per distinct input.

The stage checks its parameters, has :mod:`mstl.data.export` build (or find) the export, and logs
it to MLflow: parameters, counts, the logged tables, montages and (optionally) the slices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import pandas as pd

from mstl import defaults
from mstl.data import export as library
from mstl.data.export import IMAGE_FORMATS, SELECTIONS, Export, ExportSpec, export_key
from mstl.dicom.selection import NODULE_COUNTING
from mstl.tracking import log_params, start_stage_run

__all__ = ["Export", "PrepareParams", "build_export", "export_key", "run_prepare"]

LOGGED_TABLES = ("manifest.csv", "summary.json", "series.csv", "skipped.csv", "duplicates.csv")


@dataclass(frozen=True)
class PrepareParams(ExportSpec):
    """Parameters of `-e prepare_transition`."""

    export_dir: str = defaults.EXPORT_DIR
    log_slices: bool = True
    experiment: str = defaults.EXPERIMENT_NAME

    def validate(self) -> None:
        if bool(self.dicom_root) == bool(self.slices_root):
            raise ValueError(
                "give exactly one of dicom_root (DICOM studies) or slices_root (folders of PNG/JPG "
                "slices)"
            )
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(
                f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}"
            )
        if self.window_width <= 0:
            raise ValueError(f"window_width must be positive, got {self.window_width}")
        if not 0 <= self.min_lung_fraction <= 1:
            raise ValueError(f"min_lung_fraction must be in [0, 1], got {self.min_lung_fraction}")
        if self.labels_csv and not Path(self.labels_csv).is_file():
            raise FileNotFoundError(f"labels_csv not found: {self.labels_csv}")
        if self.slices_root and self.labels_csv:
            raise ValueError(
                "with slices_root the class folders are the labels; labels_csv is for dicom_root"
            )
        self.validate_nodules()

    def validate_nodules(self) -> None:
        """The nodule selection needs DICOM (positions in mm) and a nodules CSV."""
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.nodule_counting not in NODULE_COUNTING:
            raise ValueError(
                f"nodule_counting must be one of {NODULE_COUNTING}, got {self.nodule_counting!r}"
            )
        if "nodule" in self.selection and not (self.dicom_root and self.nodules_csv):
            raise ValueError(f"selection={self.selection} needs dicom_root and nodules_csv")
        if self.nodules_csv and not Path(self.nodules_csv).is_file():
            raise FileNotFoundError(f"nodules_csv not found: {self.nodules_csv}")
        if self.nodule_mm < 0:
            raise ValueError(f"nodule_mm must be 0 or more, got {self.nodule_mm}")

    @property
    def source(self) -> str:
        return "dicom" if self.dicom_root else "slices"


def build_export(params: PrepareParams) -> Export:
    """The export for these parameters under ``export_dir``, built once per distinct input."""
    return library.build_export(params, params.export_dir)


def log_export(export: Export, log_slices: bool) -> None:
    """The export's key, place, counts, tables and montages (and slices) into the active run."""
    log_params(
        {
            "export_key": export.summary["export_key"],
            "export_path": str(export.folder),
            "reused_export": export.reused,
        }
    )
    mlflow.log_metrics({k: v for k, v in export.summary.items() if isinstance(v, (int, float))})
    for name in LOGGED_TABLES:
        if (export.folder / name).is_file():
            mlflow.log_artifact(str(export.folder / name))
    mlflow.log_artifacts(str(export.folder / "montages"), "montages")
    if log_slices:
        mlflow.log_artifacts(str(export.folder / "slices"), "slices")


def run_prepare(params: PrepareParams) -> str:
    """Run prepare_transition inside one MLflow run; returns the run ID."""
    params.validate()
    with start_stage_run(params.experiment, f"prepare-{params.source}") as run:
        mlflow.set_tags({"stage": "prepare_transition", "source": params.source})
        log_params({k: v for k, v in asdict(params).items() if k != "experiment"})
        export = build_export(params)
        log_export(export, params.log_slices)
        skipped = export.folder / "skipped.csv"
        if skipped.is_file():
            n = len(pd.read_csv(skipped))
            if n:
                print(f"warning: {n} file(s) skipped; reasons in the run's skipped.csv")
        print(
            f"prepare_transition: {export.summary} ({'reused' if export.reused else 'new'} export "
            f"{export.folder})"
        )
        return run.info.run_id
