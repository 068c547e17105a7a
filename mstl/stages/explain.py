"""The `explain` stage: Grad-CAM overlays for any image or DICOM slice and any logged or registered
model."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image

from mstl import defaults
from mstl.data.images import IMAGE_SUFFIXES
from mstl.data.montage import montage
from mstl.evaluation.gradcam import GradCam, overlay
from mstl.inference.pyfunc import load_classifier, request_grey
from mstl.tracking import log_params, start_stage_run


@dataclass(frozen=True)
class ExplainParams:
    """Parameters of `-e explain`."""

    model_uri: str = "models:/mstl-covid-ct@champion"
    images: str = ""  # files or folders, comma-separated (PNG, JPG or DICOM)
    experiment: str = defaults.EXPERIMENT_NAME


def image_files(spec: str) -> list[Path]:
    files = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        path = Path(item)
        if path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES | {".dcm"})
            )
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"image not found: {item}")
    if not files:
        raise ValueError(f"no image to explain in {spec!r}")
    return files


def run_explain(params: ExplainParams) -> str:
    files = image_files(params.images)
    classifier = load_classifier(params.model_uri)[0]
    config = classifier.config
    with start_stage_run(params.experiment, "explain") as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tag("stage", "explain")
        log_params(
            {k: v for k, v in asdict(params).items() if k != "experiment"}
            | {"n_images": len(files)}
        )
        grey = np.stack([request_grey(f.read_bytes(), config) for f in files])
        prob = classifier.predict_grey(grey)
        heatmaps = GradCam(classifier.model).on_slices(grey, classifier.preprocess_input)
        out = Path(tmp)
        captions = []
        for i, (f, g, h, p) in enumerate(zip(files, grey, heatmaps, prob, strict=False)):
            Image.fromarray(overlay(g, h)).save(out / f"{i:03d}_{f.stem[:40]}.png")
            captions.append(f"{i:03d} p={p:.2f}")
        montage(
            [overlay(g, h) for g, h in zip(grey, heatmaps, strict=False)],
            captions,
            columns=min(6, len(files)),
            title=f"Grad-CAM, {params.model_uri}",
            side=160,
        ).save(out / "sheet.png")
        mlflow.log_artifacts(tmp, "explanations")
        print(f"explain: {len(files)} image(s); probabilities {np.round(prob, 3).tolist()}")
        return run.info.run_id
