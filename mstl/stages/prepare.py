"""The prepare_transition stage: DICOM CT studies (or folders of 2-D slices) in; a manifest of
selected, windowed lung slices with their labels out, exported once per distinct input.

The export is keyed by a hash of the input files' contents and the parameters, so re-running on the
same input reuses it. It is written to a temporary folder and renamed into place at the end, so an
interrupted export never leaves a half-written manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from mstl import defaults
from mstl.array_cache import sha256_file
from mstl.data.images import ImageReadError, open_grey
from mstl.data.montage import montage
from mstl.data.slices import (
    DROP,
    NEAR_DUPLICATE_BITS,
    check_two_classes,
    difference_hash,
    group_near_duplicates,
    parse_label_map,
    scan_slice_folder,
)
from mstl.dicom.selection import AIR_HU, MIN_LUNG_FRACTION, lung_area, select_slices
from mstl.dicom.series import ScanResult, read_hu, scan, window
from mstl.tracking import log_params, start_stage_run

EXPORT_VERSION = "1"  # bump when the export's content for the same input changes
MONTAGE_MAX = 60  # slices shown per series montage (evenly spaced)
IMAGE_FORMATS = ("png", "jpg")
DEFAULT_LABEL_MAP = {"benign": "0", "malignant": "1", "0": "0", "1": "1"}
LABEL_KEYS = ("sop_instance_uid", "series_instance_uid", "patient_id")  # most specific first
MANIFEST_COLUMNS = [
    "file",
    "patient_id",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "instance_number",
    "slice_position",
    "lung_fraction",
    "lung_area",
    "source_sha256",
    "label",
    "label_name",
]


@dataclass(frozen=True)
class PrepareParams:
    """Parameters of `-e prepare_transition`."""

    dicom_root: str = ""
    slices_root: str = ""
    labels_csv: str = ""
    label_map: str = ""
    window_width: float = defaults.WINDOW_WIDTH
    window_level: float = defaults.WINDOW_LEVEL
    min_lung_fraction: float = MIN_LUNG_FRACTION
    air_hu: float = AIR_HU
    image_format: str = "png"
    group_near_duplicates: bool = True
    near_duplicate_bits: int = NEAR_DUPLICATE_BITS
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

    @property
    def source(self) -> str:
        return "dicom" if self.dicom_root else "slices"


@dataclass
class Export:
    folder: Path
    manifest: pd.DataFrame
    summary: dict
    reused: bool


def export_key(params: PrepareParams) -> str:
    """Hash of every input file's path and content, the labels file and the parameters that shape
    the export."""
    root = Path(params.dicom_root or params.slices_root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{'dicom_root' if params.dicom_root else 'slices_root'} is not a folder: {root}"
        )
    digest = hashlib.sha256(EXPORT_VERSION.encode())
    shaping = {
        k: v
        for k, v in asdict(params).items()
        if k
        not in ("export_dir", "log_slices", "experiment", "dicom_root", "slices_root", "labels_csv")
    }
    digest.update(json.dumps(shaping, sort_keys=True).encode())
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for path in tqdm(files, desc="hashing input", unit="file", mininterval=2):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(bytes.fromhex(sha256_file(path)))
    if params.labels_csv:
        digest.update(bytes.fromhex(sha256_file(Path(params.labels_csv))))
    return digest.hexdigest()[:32]


def read_labels(params: PrepareParams) -> tuple[str, dict[str, tuple[int | None, str]]] | None:
    """(key column, {key: (label or None for drop, label name)}) from ``labels_csv``."""
    if not params.labels_csv:
        return None
    table = pd.read_csv(params.labels_csv, dtype=str)
    key = next((k for k in LABEL_KEYS if k in table.columns), None)
    if key is None or "label" not in table.columns:
        raise ValueError(
            f"labels_csv {params.labels_csv} needs a 'label' column and one of {LABEL_KEYS}; has "
            f"{list(table.columns)}"
        )
    mapping = {**DEFAULT_LABEL_MAP, **parse_label_map(params.label_map)}
    out: dict[str, tuple[int | None, str]] = {}
    for k, name in zip(table[key].str.strip(), table["label"].str.strip(), strict=False):
        value = mapping.get(name.lower())
        if value is None:
            raise ValueError(
                f"label {name!r} in {params.labels_csv} is not in label_map; known: "
                f"{sorted(mapping)} (e.g. label_map='{name}=1')"
            )
        out[k] = (None if value == DROP else int(value), name)
    return key, out


def write_skipped(skipped: list[tuple[str, str]], folder: Path) -> None:
    """skipped.csv (logged: content hash and reason, no names) and skipped_paths.csv (local
    only)."""
    hashed = [(sha256_file(Path(p)) if Path(p).is_file() else "", reason) for p, reason in skipped]
    pd.DataFrame(hashed, columns=["source_sha256", "reason"]).to_csv(
        folder / "skipped.csv", index=False
    )
    pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(
        folder / "skipped_paths.csv", index=False
    )


def save_slice(pixels: np.ndarray, path: Path, image_format: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels, mode="L")
    if image_format == "png":
        image.save(path, compress_level=1)
    else:
        image.save(path, quality=95)


def export_dicom(params: PrepareParams, folder: Path) -> tuple[pd.DataFrame, dict]:
    scanned: ScanResult = scan(
        params.dicom_root,
        progress=lambda it: tqdm(it, desc="reading DICOM headers", unit="file", mininterval=2),
    )
    labels = read_labels(params)
    rows, series_rows = [], []
    total = sum(len(s.slices) for s in scanned.series)
    bar = tqdm(total=total, desc="HU, lung selection, export", unit="slice", mininterval=2)
    # PNG/JPG encoding releases the GIL: write in threads while the next series is read.
    writer = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
    pending = []
    for k, series in enumerate(scanned.series):
        windowed, areas = [], []
        for header in series.slices:
            hu = read_hu(header)
            areas.append(lung_area(hu, params.air_hu))
            windowed.append(window(hu, params.window_width, params.window_level))
            bar.update(1)
        keep, relative = select_slices(np.asarray(areas), params.min_lung_fraction)
        for i, (header, pixels) in enumerate(zip(series.slices, windowed, strict=False)):
            if not keep[i]:
                continue
            label, name = None, ""
            if labels is not None:
                key = {
                    "sop_instance_uid": header.sop_uid,
                    "series_instance_uid": header.series_uid,
                    "patient_id": header.patient_id,
                }[labels[0]]
                if key in labels[1]:
                    label, name = labels[1][key]
                    if label is None:
                        continue  # label_map says drop
            rel = f"slices/s{k:03d}/{i:04d}.{params.image_format}"
            pending.append(writer.submit(save_slice, pixels, folder / rel, params.image_format))
            rows.append(
                {
                    "file": rel,
                    "patient_id": header.patient_id,
                    "study_instance_uid": header.study_uid,
                    "series_instance_uid": header.series_uid,
                    "sop_instance_uid": header.sop_uid,
                    "instance_number": header.instance_number,
                    "slice_position": series.positions[i],
                    "lung_fraction": round(float(relative[i]), 4),
                    "lung_area": round(float(areas[i]), 5),
                    "source_sha256": sha256_file(Path(header.path)),
                    "label": label,
                    "label_name": name,
                }
            )
        series_rows.append(
            {
                "series": f"s{k:03d}",
                "series_instance_uid": series.uid,
                "patient_id": series.patient_id,
                "n_slices": len(series.slices),
                "n_kept": int(keep.sum()),
                "ordering": series.ordering,
            }
        )
        shown = np.unique(
            np.linspace(0, len(windowed) - 1, min(len(windowed), MONTAGE_MAX)).round().astype(int)
        )
        sheet = montage(
            [windowed[i] for i in shown],
            [f"{series.positions[i]:.0f} mm\nf={relative[i]:.2f}" for i in shown],
            columns=10,
            title=f"series s{k:03d}: {int(keep.sum())}/{len(keep)} kept (green), rejected (red) "
            f"at min_lung_fraction={params.min_lung_fraction}"
            + (
                ""
                if len(shown) == len(windowed)
                else f"; {len(shown)} of {len(windowed)} slices shown"
            ),
            colors=["green" if keep[i] else "red" for i in shown],
        )
        (folder / "montages").mkdir(exist_ok=True)
        sheet.save(folder / "montages" / f"s{k:03d}.png")
    bar.close()
    try:
        for future in pending:
            future.result()  # re-raises any write error
    finally:
        writer.shutdown(cancel_futures=True)
    if not rows:
        reasons = pd.Series([r for _, r in scanned.skipped]).value_counts().head(5).to_dict()
        raise ValueError(
            f"nothing usable under {params.dicom_root}: {scanned.files} files, {scanned.non_dicom} "
            "not DICOM, "
            f"{len(scanned.skipped)} skipped (most common reasons: {reasons}), no slice kept"
        )
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    if labels is not None:
        check_two_classes(manifest["label"], params.labels_csv)
    pd.DataFrame(series_rows).to_csv(folder / "series.csv", index=False)
    write_skipped(scanned.skipped, folder)
    summary = {
        "n_files": scanned.files,
        "n_non_dicom": scanned.non_dicom,
        "n_skipped": len(scanned.skipped),
        "n_series": len(scanned.series),
        "n_slices": total,
        "n_kept": len(manifest),
        "n_labelled": int(manifest["label"].notna().sum()),
    }
    return manifest, summary


def export_slices(params: PrepareParams, folder: Path) -> tuple[pd.DataFrame, dict]:
    found = scan_slice_folder(params.slices_root, parse_label_map(params.label_map))
    names = sorted(set(found.labels))
    numeric = all(n.lstrip("-").isdigit() for n in names)
    to_int = {n: (int(n) if numeric else i) for i, n in enumerate(names)}
    rows, hashes, skipped, thumbs = [], [], list(found.skipped), {}
    for path, name in tqdm(
        list(zip(found.files, found.labels, strict=False)),
        desc="grey, hash, export",
        unit="slice",
        mininterval=2,
    ):
        try:
            grey = open_grey(path)
        except ImageReadError as exc:
            skipped.append((str(path), str(exc)))
            continue
        rel = f"slices/{len(rows):05d}.{params.image_format}"
        pixels = np.asarray(grey, dtype=np.uint8)
        save_slice(pixels, folder / rel, params.image_format)
        hashes.append(difference_hash(grey))
        thumbs.setdefault(name, [])
        if len(thumbs[name]) < 24:
            thumbs[name].append(pixels)
        rows.append(
            {
                "file": rel,
                "source_sha256": sha256_file(path),
                "label": to_int[name],
                "label_name": name,
            }
        )
    if not rows:
        raise ValueError(
            f"nothing usable under {params.slices_root}: {len(skipped)} file(s) skipped"
        )
    manifest = pd.DataFrame(rows)
    if params.group_near_duplicates:
        groups = group_near_duplicates(np.stack(hashes), params.near_duplicate_bits)
        manifest["patient_id"] = [f"group-{g:05d}" for g in groups]
    else:
        warnings.warn(
            f"{params.slices_root} has no patient IDs and group_near_duplicates is off: each slice "
            "is its own "
            "group, so near-identical neighbouring slices can fall on both sides of the split",
            stacklevel=2,
        )
        manifest["patient_id"] = [f"slice-{i:05d}" for i in range(len(manifest))]
    for column in MANIFEST_COLUMNS:
        if column not in manifest:
            manifest[column] = None
    manifest = manifest[MANIFEST_COLUMNS]
    # Names of source files can carry PHI: the logged tables name files by content hash; the
    # *_paths.csv twins with local paths stay in the local export folder for the user.
    pd.DataFrame(
        [(sha256_file(Path(a)), sha256_file(Path(b))) for a, b in found.duplicates],
        columns=["kept_sha256", "duplicate_sha256"],
    ).to_csv(folder / "duplicates.csv", index=False)
    pd.DataFrame(found.duplicates, columns=["kept", "duplicate"]).to_csv(
        folder / "duplicates_paths.csv", index=False
    )
    write_skipped(skipped, folder)
    (folder / "montages").mkdir(exist_ok=True)
    for name, images in thumbs.items():
        sheet = montage(
            images,
            [""] * len(images),
            columns=8,
            title=f"class {name!r} (label {to_int[name]}): sample slices",
        )
        sheet.save(folder / "montages" / f"class_{to_int[name]}.png")
    summary = {
        "n_files": len(found.files) + len(found.duplicates) + len(found.skipped),
        "n_duplicates": len(found.duplicates),
        "n_skipped": len(skipped),
        "n_kept": len(manifest),
        "n_groups": int(manifest["patient_id"].nunique()),
        "n_classes": len(names),
    }
    return manifest, summary


def build_export(params: PrepareParams) -> Export:
    """Export once per distinct input; a finished export with the same key is reused as it is."""
    key = export_key(params)
    final = Path(params.export_dir).resolve() / key
    if (final / "manifest.csv").is_file():
        summary = json.loads((final / "summary.json").read_text())
        return Export(final, pd.read_csv(final / "manifest.csv"), summary, reused=True)
    tmp = final.with_name(f".{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest, summary = (export_dicom if params.dicom_root else export_slices)(params, tmp)
        summary["export_key"] = key
        manifest.to_csv(tmp / "manifest.csv", index=False)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        if final.exists():  # a concurrent run finished first: keep its export
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Export(final, pd.read_csv(final / "manifest.csv"), summary, reused=False)


def run_prepare(params: PrepareParams) -> str:
    """Run prepare_transition inside one MLflow run; returns the run ID."""
    params.validate()
    with start_stage_run(params.experiment, f"prepare-{params.source}") as run:
        mlflow.set_tags({"stage": "prepare_transition", "source": params.source})
        log_params({k: v for k, v in asdict(params).items() if k != "experiment"})
        export = build_export(params)
        log_params(
            {
                "export_key": export.summary["export_key"],
                "export_path": str(export.folder),
                "reused_export": export.reused,
            }
        )
        mlflow.log_metrics({k: v for k, v in export.summary.items() if isinstance(v, (int, float))})
        for name in ("manifest.csv", "summary.json", "series.csv", "skipped.csv", "duplicates.csv"):
            if (export.folder / name).is_file():
                mlflow.log_artifact(str(export.folder / name))
        mlflow.log_artifacts(str(export.folder / "montages"), "montages")
        if params.log_slices:
            mlflow.log_artifacts(str(export.folder / "slices"), "slices")
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
