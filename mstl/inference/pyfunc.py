"""The served model: a pyfunc that answers a CT image (PNG/JPG bytes) or a DICOM slice with the
probability of COVID-19 and the label at the stored threshold, through exactly the training
preprocessing (grey first, the run's :class:`~mstl.data.preprocessing.Preprocessing`: optional lung
crop, resize, optional intensity normalisation, optional lung mask; then the backbone's own
``preprocess_input``; DICOM through HU and the lung window as in prepare_transition), the stored
test-time augmentation (``tta``) and temperature. An ensemble is the same pyfunc holding several
Keras models (``members`` in its config): the mean of their served probabilities.

Requests are a DataFrame with one column, ``image``, holding base64-encoded file bytes::

    curl -X POST http://127.0.0.1:5000/invocations -H 'Content-Type: application/json' \\
      -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64 of a PNG, JPG or DICOM
      file>"]]}}'
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import tempfile
from importlib import metadata
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pydicom
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from packaging.requirements import Requirement
from PIL import Image

from mstl import PACKAGE_DIR, defaults
from mstl.data.images import ImageReadError, open_grey
from mstl.data.labelled import EvaluationInputError
from mstl.data.preprocessing import Preprocessing
from mstl.dicom.series import dataset_hu, window
from mstl.inference.predict import predict_probability
from mstl.models import get_backbone
from mstl.tracking import mlflow_false_alarms_silenced, tracking_uri

INPUT_COLUMN = "image"
MIN_SIDE = 32  # smaller images carry no lung detail at the networks' inputs; refused by name


class BadRequest(MlflowException):
    """Answered as HTTP 400 by the scoring server; the server keeps serving."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def request_grey(data: bytes, config: dict, min_side: int = 0) -> np.ndarray:
    """File bytes -> the (image_size, image_size) uint8 grey the model reads, for an image or a
    DICOM CT slice, prepared as the served model's ``config`` says; an image with a side under
    ``min_side`` pixels is refused."""
    if not data:
        raise BadRequest("empty image: the request's image field decodes to 0 bytes")
    if len(data) > 132 and data[128:132] == b"DICM":
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except Exception as exc:
            raise BadRequest(f"unreadable DICOM: {type(exc).__name__}: {exc}") from None
        modality = str(ds.get("Modality", "")).upper()
        if modality != "CT":
            raise BadRequest(f"DICOM modality {modality or 'missing'} is not CT")
        if "PixelData" not in ds:
            raise BadRequest("DICOM without pixel data")
        try:
            grey = Image.fromarray(
                window(dataset_hu(ds), config["window_width"], config["window_level"]), mode="L"
            )
        except Exception as exc:
            raise BadRequest(
                f"cannot decode the DICOM pixel data: {type(exc).__name__}: {exc}"
            ) from None
    else:
        try:
            grey = open_grey(data, name="the request's image")
        except ImageReadError as exc:
            raise BadRequest(str(exc)) from None
    if min(grey.size) < min_side:
        raise BadRequest(f"image of {grey.size[0]}x{grey.size[1]} px is smaller than {min_side} px")
    return Preprocessing.from_config(config)(grey)


def decode_field(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise BadRequest(f"the image field must be a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"the image field is not valid base64: {exc}") from None


class CTClassifier(mlflow.pyfunc.PythonModel):
    """Keras classifier(s) + preprocessing + test-time augmentation + temperature + threshold."""

    def load_context(self, context) -> None:
        self.config = json.loads(Path(context.artifacts["config"]).read_text())
        members = self.config.get("members") or [{}]
        self.models = [
            keras.models.load_model(context.artifacts[member_artifact(i)], compile=False)
            for i in range(len(members))
        ]
        self.temperatures = [
            float(m.get("temperature", self.config.get("temperature", 1.0))) for m in members
        ]
        self.model = self.models[0]  # what Grad-CAM and the probes read (an ensemble: member 0)
        self.preprocess_input = get_backbone(self.config["backbone"]).preprocess_input

    def predict_grey(self, grey: np.ndarray) -> np.ndarray:
        """The probability of the positive class for decoded slices: each model's (through the one
        batched prediction, its test-time views and its temperature), averaged over models."""
        tta = self.config.get("tta", "none")
        probs = [
            predict_probability(model, grey, self.preprocess_input, defaults.BATCH_SIZE, tta, t)
            for model, t in zip(self.models, self.temperatures, strict=True)
        ]
        return probs[0] if len(probs) == 1 else np.mean(probs, axis=0)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        # The hint says what pyfunc passes (the signature's DataFrame); MLflow infers no schema from
        # it (the logged signature is the schema) and stops warning that predict has no type hints.
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if INPUT_COLUMN not in frame.columns or frame.empty:
            raise BadRequest(
                f"send a DataFrame with a non-empty column {INPUT_COLUMN!r} of base64-encoded "
                "image or DICOM bytes"
            )
        c = self.config
        greys = []
        for row, value in enumerate(frame[INPUT_COLUMN]):
            try:
                greys.append(request_grey(decode_field(value), c))
            except BadRequest as exc:
                raise BadRequest(f"row {row}: {exc.message}") from None
        probability = self.predict_grey(np.stack(greys))
        return pd.DataFrame(
            {
                "probability": probability.astype(float),
                "label": (probability >= c["threshold"]).astype(int),
            }
        )


def member_artifact(i: int) -> str:
    """The artifact name of an ensemble's i-th Keras model (a single model's is the first)."""
    return "keras_model" if i == 0 else f"keras_model_{i}"


def serving_config(
    backbone: str,
    preprocessing: Preprocessing,
    threshold: float,
    tta: str = "none",
    temperature: float = 1.0,
) -> dict:
    """What the served model needs besides its weights; models logged before ``tta`` and
    ``temperature`` existed read as none and 1."""
    return {
        "backbone": backbone,
        **preprocessing.config(),
        "threshold": threshold,
        "tta": tta,
        "temperature": temperature,
        "window_width": defaults.WINDOW_WIDTH,
        "window_level": defaults.WINDOW_LEVEL,
    }


def serving_requirements() -> list[str] | None:
    """The served model's pip requirements: this installation's own dependencies (the TensorFlow
    build its extras chose included), pinned to the installed versions. Complete where MLflow's
    inference is not (it missed pydicom, imported only for DICOM input) and without ``mstl`` itself,
    which travels as code and is not on PyPI; it also spares the inference subprocess. None when
    mstl runs without being installed: MLflow then infers."""
    try:
        declared = metadata.requires("mstl") or []
    except metadata.PackageNotFoundError:
        return None
    environments = [
        {"extra": extra} for extra in ("", "cpu", "gpu")
    ]  # runtime extras, not test or postgres
    pins = {}
    for text in declared:
        requirement = Requirement(text)
        if requirement.marker and not any(requirement.marker.evaluate(env) for env in environments):
            continue
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            continue  # the TensorFlow build of another extra
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        pins[requirement.name] = f"{requirement.name}{extras}=={version}"
    return sorted(pins.values())


def log_serving_model(
    model: keras.Model | list[keras.Model],
    config: dict,
    example_file: str | Path,
    name: str = "classifier",
):
    """Log the pyfunc (with the mstl package as code, a signature and a real input example); a list
    of models is an ensemble, whose ``config["members"]`` has one entry per model."""
    models = model if isinstance(model, list) else [model]
    if len(models) != len(config.get("members") or [{}]):
        raise ValueError(
            f"{len(models)} model(s) but the config lists {len(config['members'])} members"
        )
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {}
        for i, member in enumerate(models):
            path = Path(tmp) / ("classifier.keras" if i == 0 else f"classifier_{i}.keras")
            member.save(path)
            artifacts[member_artifact(i)] = str(path)
        config_path = Path(tmp) / "config.json"
        config_path.write_text(json.dumps(config, indent=2))
        artifacts["config"] = str(config_path)
        example = pd.DataFrame(
            {INPUT_COLUMN: [base64.b64encode(Path(example_file).read_bytes()).decode()]}
        )
        loaded = CTClassifier()  # only to compute the output signature; a fresh one is logged
        loaded.load_context(type("Context", (), {"artifacts": artifacts}))
        with mlflow_false_alarms_silenced():
            signature = infer_signature(example, loaded.predict(None, example))
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PACKAGE_DIR / "stages" / "serve.py"),
            artifacts=artifacts,
            code_paths=[str(PACKAGE_DIR)],
            signature=signature,
            input_example=example,
            pip_requirements=serving_requirements(),
        )


def decode_set(
    table: pd.DataFrame, config: dict, skip_unreadable: bool
) -> tuple[np.ndarray, list[str], list[int], list[tuple[str, str]]]:
    """Each file through the served model's own preprocessing: (grey, sha256s, kept rows, skipped
    (path, reason))."""
    grey, hashes, kept, skipped = [], [], [], []
    for i, path in enumerate(table["path"]):
        try:
            data = Path(path).read_bytes()
            grey.append(request_grey(data, config, MIN_SIDE))
        except (BadRequest, OSError) as exc:
            reason = exc.message if isinstance(exc, BadRequest) else f"{type(exc).__name__}: {exc}"
            if not skip_unreadable:
                raise EvaluationInputError(f"cannot use {path}: {reason}") from None
            skipped.append((path, reason))
            continue
        hashes.append(hashlib.sha256(data).hexdigest())
        kept.append(i)
    if not grey:
        raise EvaluationInputError("no usable image in the set: every file was skipped")
    return np.stack(grey), hashes, kept, skipped


def model_version(client, uri: str):
    """The registered version a ``models:/name/version`` or ``models:/name@alias`` URI names, else
    None."""
    if not uri.startswith("models:/") or uri.startswith("models:/m-"):
        return None
    ref = uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = ref.partition("/")
    return client.get_model_version(name, version) if version.isdigit() else None


def load_classifier(uri: str):
    """The served pyfunc's Python model (Keras model + config) and its logged-model ID, or an error
    naming the URI."""
    if uri.startswith("runs:/") and uri.rstrip("/").count("/") == 1:
        uri = uri.rstrip("/") + "/classifier"
    try:
        info = mlflow.models.get_model_info(uri)
        classifier = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    except (
        Exception
    ) as exc:  # MlflowException, OSError, ...: the URI does not resolve to a served model
        raise EvaluationInputError(
            f"model_uri {uri!r} does not resolve to an mstl model on {tracking_uri()}: {exc}"
        ) from None
    if not hasattr(classifier, "config"):
        raise EvaluationInputError(f"model_uri {uri!r} is not an mstl served classifier")
    return classifier, info.model_id, uri
