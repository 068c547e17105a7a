"""The Target stage: fine-tune a classifier on COVID-CT, evaluate it on the test split, log it all.

Started from ImageNet weights it is the paper's baseline; started from a Transition model
(``init_from``) it is the last step of MSTL.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import LoggedModelInput

from mstl import defaults
from mstl.data import covid_ct
from mstl.data.images import decode_images_cached
from mstl.data.pipeline import augment_policy, check_tta
from mstl.data.preprocessing import Preprocessing
from mstl.evaluation import bootstrap_metrics, confusion_figure, roc_figure
from mstl.evaluation.calibration import (
    OPERATING_POINTS,
    expected_calibration_error,
    fit_temperature,
    youden_threshold,
)
from mstl.evaluation.gradcam import GradCam, error_sheet
from mstl.evaluation.probes import shortcut_probes
from mstl.inference.predict import apply_temperature, predict_grey
from mstl.inference.pyfunc import log_serving_model, serving_config
from mstl.models import OutputSpec, build_classifier, get_backbone, reinitialise_head
from mstl.stages.evaluate import EvaluateParams, external_evaluations, run_evaluate
from mstl.tracking import (
    MODEL_ID_TAG,
    log_dataset,
    log_figure,
    log_params,
    log_table,
    resolve_run,
    start_stage_run,
)
from mstl.training.checkpoints import log_checkpoint, log_model_structure
from mstl.training.fit import distribution_scope, fit_classifier, set_seed
from mstl.training.params import ClassifierParams


@dataclass(frozen=True)
class TargetParams(ClassifierParams):
    """Parameters of `-e target`."""

    # none, mild (flip, small rotation and zoom; the old true) or field (crops and zoom-out with
    # padding, window/gamma/contrast, blur, JPEG, flips: mstl.data.pipeline); any but none turns
    # the frozen-half cache off, since the input then changes every epoch
    augment: str = "none"
    # zero every pixel outside the lung field after resizing (mstl.data.preprocessing); stored with
    # the served model, which applies it the same way
    lung_mask: bool = False
    tta: str = "none"  # test-time augmentation: none, flip or flip_zoom; stored with the model
    # fit a temperature on the validation probabilities (NLL) and store it with the served model:
    # on by default, since it leaves the ranking (AUC) and the calls at 0.5 (logit 0) unchanged and
    # only makes the probabilities mean what they say (docs/results.md, the levers table)
    temperature_scaling: bool = True
    # fixed: the served threshold is `threshold`; youden: the one maximising sensitivity +
    # specificity on the validation split (after temperature scaling), stored with the model
    operating_point: str = "fixed"
    data_root: str = defaults.DATA_ROOT
    split: str = defaults.SPLIT
    skip_unreadable: bool = False
    dropout: float = defaults.DROPOUT
    threshold: float = defaults.THRESHOLD
    n_bootstrap: int = defaults.N_BOOTSTRAP
    log_model: bool = True
    init_from: str = ""
    # a CSV of path,sha256 for COVID-CT's images, computed once by the experiment grid for all its
    # Target cells; empty: hash the files here
    file_hashes: str = ""
    # labelled sets from other hospitals, the trained model evaluated on each as an `evaluate` run
    # nested under this one (as the grid's cells are): a comma list of folders (a sub-folder per
    # class) or labels CSVs; not part of what makes two Target runs the same
    external_sets: str = ""
    external_positive_class: str = "COVID"  # the positive sub-folder of each folder set
    external_patient_pattern: str = ""  # evaluate's patient_pattern, for folder sets
    experiment: str = defaults.EXPERIMENT_NAME

    @property
    def preprocessing(self) -> Preprocessing:
        """The shared preprocessing plus Target's lung mask; stored with the served model."""
        return replace(super().preprocessing, lung_mask=self.lung_mask)

    def validate(self) -> None:
        """Fail on impossible parameters before any data is read."""
        self.validate_network()
        augment_policy(self.augment)
        check_tta(self.tta)
        if self.operating_point not in OPERATING_POINTS:
            raise ValueError(
                f"unknown operating_point {self.operating_point!r}; use one of "
                f"{', '.join(OPERATING_POINTS)}"
            )
        if self.split not in covid_ct.SPLIT_MODES:
            raise ValueError(
                f"unknown split {self.split!r}; use one of {', '.join(covid_ct.SPLIT_MODES)}"
            )
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.file_hashes and not Path(self.file_hashes).is_file():
            raise ValueError(f"file_hashes {self.file_hashes!r} is not a file")
        OutputSpec("binary", 1, self.dropout)
        self.external_list()

    def external_list(self) -> list[EvaluateParams]:
        """One `evaluate` of this run's model per external set (checked: present, distinct)."""
        return external_evaluations(
            self.external_sets, self.external_positive_class, self.external_patient_pattern
        )


# Not logged, and not part of what makes two Target runs the same: where the run goes, and where
# the grid left the hashes it computed once.
NOT_LOGGED = (
    "experiment",
    "file_hashes",
    "external_sets",
    "external_positive_class",
    "external_patient_pattern",
)
DATASET_CONTEXT = {"train": "training", "val": "validation", "test": "test"}
HASH_COLUMNS = ["path", "sha256"]


def strategy_of(weights: str) -> str:
    """The run's ``strategy`` tag: where the starting weights came from."""
    w = str(weights).lower()
    return (
        "imagenet"
        if w == "imagenet"
        else "scratch"
        if w in ("none", "", "null")
        else "weights_file"
    )


@dataclass(frozen=True)
class Served:
    """What the served model does after the network: test-time views, temperature, threshold."""

    tta: str = "none"
    temperature: float = 1.0
    threshold: float = defaults.THRESHOLD

    def probability(self, model, grey, preprocess_input, batch_size: int) -> np.ndarray:
        """The served probability (as ``mstl.inference.predict.predict_probability`` computes
        it)."""
        prob = predict_grey(model, grey, preprocess_input, batch_size, self.tta)[:, 0]
        return apply_temperature(prob, self.temperature)


def choose_served(model, params: TargetParams, data: TargetData) -> Served:
    """Fit the temperature (``temperature_scaling``) and choose the threshold
    (``operating_point``) on the validation split; log both and the validation ECE before
    scaling."""
    val = data.parts["val"]
    y = data.index.loc[val, "label"].to_numpy().astype(int)
    preprocess = get_backbone(params.backbone).preprocess_input
    raw = Served(params.tta).probability(model, data.grey[val], preprocess, params.batch_size)
    temperature = fit_temperature(y, raw) if params.temperature_scaling else 1.0
    prob = apply_temperature(raw, temperature)
    youden = params.operating_point == "youden"
    threshold = youden_threshold(y, prob) if youden else params.threshold
    mlflow.log_metrics(
        {
            "temperature": temperature,
            "operating_threshold": threshold,
            "val_ece_unscaled": expected_calibration_error(y, raw),
        }
    )
    return Served(params.tta, temperature, threshold)


def log_calibration(predictions: dict[str, pd.DataFrame], served: Served) -> None:
    """ECE of the served probabilities per split, and of the probabilities before temperature
    scaling on test (T undone: sigmoid(logit(p) * T))."""
    values = {
        f"{name}_ece": expected_calibration_error(frame["label"], frame["probability"])
        for name, frame in predictions.items()
    }
    test = predictions["test"]
    unscaled = apply_temperature(test["probability"].to_numpy(), 1.0 / served.temperature)
    values["test_ece_unscaled"] = expected_calibration_error(test["label"], unscaled)
    mlflow.log_metrics(values)


def evaluate_split(
    model,
    grey,
    table: pd.DataFrame,
    spec,
    params: TargetParams,
    name: str,
    strategy: str,
    model_id=None,
    dataset=None,
    served: Served | None = None,
) -> pd.DataFrame:
    """Predict one split as the served model does, log its metrics with CIs at the served
    threshold (linked to the logged model and the split's data set), pictures and predictions
    CSV."""
    served = served or Served(params.tta, 1.0, params.threshold)
    prob = served.probability(model, grey, spec.preprocess_input, params.batch_size)
    labels = table["label"].to_numpy()
    threshold = served.threshold
    estimates = bootstrap_metrics(
        labels, prob, threshold, params.n_bootstrap, defaults.CONFIDENCE, params.seed
    )
    values = estimates.flat(f"{name}_")  # test_recall, test_recall_ci_low, ...
    mlflow.log_metrics(
        {k: v for k, v in values.items() if np.isfinite(v)}, model_id=model_id, dataset=dataset
    )
    title = f"{params.backbone} ({strategy}), {name} split"
    log_figure(roc_figure(labels, prob, estimates["roc_auc"], title=title), f"plots/roc_{name}.png")
    log_figure(
        confusion_figure(labels, prob, threshold, title=title), f"plots/confusion_{name}.png"
    )
    predictions = pd.DataFrame(
        {
            "file": table["file"].to_numpy(),
            "patient_id": table["patient_id"].to_numpy(),
            "label": labels,
            "probability": prob,
        }
    )
    log_table(predictions, f"predictions/{name}.csv")
    if name == "test":
        cam = GradCam(model)
        log_explanations(cam, grey, labels, prob, spec, threshold)
        probes = shortcut_probes(model, grey, labels, spec.preprocess_input, params.batch_size, cam)
        mlflow.log_metrics(
            {f"{name}_{k}": v for k, v in probes.items() if np.isfinite(v)},
            model_id=model_id,
            dataset=dataset,
        )
    return predictions


def log_explanations(cam: GradCam, grey, labels, prob, spec, threshold: float) -> None:
    """Grad-CAM overlays of the most confident true positives, false negatives and false
    positives."""
    sheet = error_sheet(cam, grey, labels, prob, spec.preprocess_input, threshold, "test slices")
    if sheet is not None:
        with tempfile.TemporaryDirectory() as tmp:
            sheet.save(Path(tmp) / "gradcam_test.png")
            mlflow.log_artifact(str(Path(tmp) / "gradcam_test.png"), "explanations")


def transition_parent(params: TargetParams):
    """The Transition run named by ``init_from``, checked against this run's backbone (None without
    init_from)."""
    if not params.init_from:
        return None
    parent = resolve_run(params.init_from, stage="transition")
    parent_backbone = parent.data.params.get("backbone")
    if parent_backbone != params.backbone:
        raise ValueError(
            f"init_from run {parent.info.run_id} trained backbone {parent_backbone!r} but "
            f"backbone={params.backbone!r}; "
            f"pass backbone={parent_backbone}"
        )
    for name in ("lung_crop", "intensity", "lung_mask"):  # a Transition without one used none
        theirs, ours = (
            parent.data.params.get(name, str(TargetParams.__dataclass_fields__[name].default)),
            str(getattr(params, name)),
        )
        if theirs != ours:
            print(
                f"warning: the Transition run {parent.info.run_id} was trained with "
                f"{name}={theirs}, this Target uses {ours}"
            )
    return parent


def model_from_transition(parent, params: TargetParams, output: OutputSpec):
    """Rebuild the Transition network, load its best checkpoint, and put a fresh Target head on
    it."""
    source = parent.data.params
    kind = source["output"]
    source_output = OutputSpec(kind, 1 if kind == "binary" else int(source["n_classes"]))
    model = build_classifier(
        params.backbone,
        "none",
        params.image_size,
        source_output,
        int(source["dense_units"]),
        source["dense_activation"],
        int(source["pool_size"]),
        params.train_batchnorm,
    )  # the parent's head, so that its checkpoint loads
    checkpoint = mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="checkpoints/best.weights.h5"
    )
    model.load_weights(checkpoint)
    return reinitialise_head(
        model,
        output,
        get_backbone(params.backbone),
        params.train_batchnorm,
        dense_units=params.dense_units,
        dense_activation=params.dense_activation,
        pool_size=params.pool_size,
    )


@dataclass(frozen=True)
class TargetData:
    """The Target images that were read: their index, pixels, split masks and MLflow data sets."""

    index: pd.DataFrame
    grey: np.ndarray
    parts: dict[str, np.ndarray]
    datasets: dict


def run_target(params: TargetParams) -> str:
    """Run the whole Target stage inside one MLflow run; returns the run ID."""
    params.validate()
    set_seed(params.seed, params.deterministic)
    parent = transition_parent(params)
    strategy = (
        parent.data.tags.get("strategy", "transition") if parent else strategy_of(params.weights)
    )
    index = covid_ct.load_split(params.data_root, params.split, params.seed)
    with start_target_run(params, parent, strategy) as run:
        log_params({k: v for k, v in asdict(params).items() if k not in NOT_LOGGED})
        log_table(covid_ct.split_table(index), "data/split.csv")
        cache = params.array_cache()
        data = read_target_data(params, index, cache)
        if parent and parent.data.tags.get(MODEL_ID_TAG):
            mlflow.log_input(model=LoggedModelInput(parent.data.tags[MODEL_ID_TAG]))
        model = fit_target(params, parent, data, cache)
        served = choose_served(model, params, data)
        model_id = log_target_model(model, params, data, served)
        predictions = {}
        for part in ("val", "test"):
            predictions[part] = evaluate_split(
                model,
                data.grey[data.parts[part]],
                data.index[data.parts[part]],
                get_backbone(params.backbone),
                params,
                part,
                strategy,
                model_id,
                data.datasets[part],
                served,
            )
        log_calibration(predictions, served)
        evaluate_externally(params, run.info.run_id)
        return run.info.run_id


def evaluate_externally(params: TargetParams, run_id: str) -> None:
    """This run's served model on each external set, each an `evaluate` run nested under it."""
    for external in params.external_list():
        run_evaluate(
            replace(
                external,
                model_uri=f"runs:/{run_id}",
                seed=params.seed,
                experiment=params.experiment,
            )
        )


@contextlib.contextmanager
def start_target_run(params: TargetParams, parent, strategy: str):
    """The Target's run, tagged; nested under its Transition run when it starts from one."""
    run_name = f"target-{params.backbone}-{strategy}-{params.split}-s{params.seed}"
    # The parent link is a tag we set ourselves: under `mlflow run`, MLFLOW_RUN_ID can override
    # start_run's parent_run_id (MLflow issue #15713), and a finished parent cannot be "active".
    nesting = {"mlflow.parentRunId": parent.info.run_id} if parent else None
    with start_stage_run(
        params.experiment,
        run_name,
        tags=nesting,
        experiment_id=parent.info.experiment_id if parent else None,
        log_system_metrics=params.log_system_metrics,
    ) as run:
        if parent:
            mlflow.set_tag("mlflow.parentRunId", parent.info.run_id)
            if run.info.experiment_id != parent.info.experiment_id:
                print(
                    f"warning: this run's experiment {run.info.experiment_id} differs from its "
                    f"Transition parent's ({parent.info.experiment_id}); the MLflow UI nests runs "
                    "only within one experiment"
                )
        mlflow.set_tags(
            {
                "stage": "target",
                "backbone": params.backbone,
                "strategy": strategy,
                "split": params.split,
            }
        )
        yield run


def read_target_data(params: TargetParams, index: pd.DataFrame, cache) -> TargetData:
    """Decode the split's images, log what was skipped, their hashes, counts and data sets."""
    decoded = decode_images_cached(
        index["path"].tolist(), params.preprocessing, params.skip_unreadable, cache
    )
    if decoded.unreadable:
        log_table(
            pd.DataFrame(decoded.unreadable, columns=["path", "reason"]), "data/unreadable.csv"
        )
        print(f"skipped {len(decoded.unreadable)} unreadable image(s); see data/unreadable.csv")
    index = index.iloc[decoded.kept].reset_index(drop=True)
    log_lung_field_missing(index, decoded, params)
    hashes = image_sha256s(index, params.file_hashes)
    log_params(
        {
            "split_sha256": covid_ct.split_sha256(index),
            "data_sha256": covid_ct.combined_sha256(hashes),
            "n_unreadable": len(decoded.unreadable),
            **{f"n_{part}": int((index["split"] == part).sum()) for part in covid_ct.SPLITS},
        }
    )
    mlflow.log_metrics({"decode_seconds": decoded.seconds})
    parts = {part: (index["split"] == part).to_numpy() for part in covid_ct.SPLITS}
    datasets = {
        part: log_dataset(
            index.loc[parts[part], ["file", "label", "patient_id"]].reset_index(drop=True),
            name=f"covid-ct-{params.split}-{part}",
            source=str(covid_ct.dataset_dir(params.data_root)),
            digest=covid_ct.combined_sha256(hashes[parts[part]]),
            context=DATASET_CONTEXT[part],
            targets="label",
        )
        for part in covid_ct.SPLITS
    }
    return TargetData(index, decoded.pixels, parts, datasets)


def image_sha256s(index: pd.DataFrame, file_hashes: str = "") -> np.ndarray:
    """The SHA-256 of each image of ``index``, in its order: looked up in ``file_hashes`` (a CSV of
    path,sha256, which must name every image) when given, else read from the files."""
    if not file_hashes:
        return np.asarray(covid_ct.file_sha256s(index["path"]))
    known = pd.read_csv(file_hashes, dtype=str)
    if list(known.columns) != HASH_COLUMNS:
        raise ValueError(f"{file_hashes} must have the columns {HASH_COLUMNS}, got {known.columns}")
    by_path = known.set_index("path")["sha256"]
    missing = index.loc[~index["path"].isin(by_path.index), "path"]
    if len(missing):
        raise ValueError(
            f"{file_hashes} has no hash for {len(missing)} image(s) of data_root, e.g. "
            f"{missing.iloc[0]}"
        )
    return by_path.loc[index["path"]].to_numpy()


def fit_target(params: TargetParams, parent, data: TargetData, cache):
    """Build the network (from the Transition run's checkpoint, or from ``weights``) and fit it on
    the train split, keeping the weights best on validation; log the fit."""
    output = OutputSpec("binary", 1, params.dropout)
    labels = data.index["label"].to_numpy().astype("float32")
    train, val = data.parts["train"], data.parts["val"]
    with distribution_scope(params.distribute):
        model = model_from_transition(parent, params, output) if parent else params.build(output)
        log_model_structure(model)
        result = fit_classifier(
            model,
            (data.grey[train], labels[train]),
            (data.grey[val], labels[val]),
            get_backbone(params.backbone).preprocess_input,
            output,
            params.fit_config(),
            cache,
        )
    log_params(result.params(cache))
    mlflow.log_metrics(result.metrics())
    return model


def log_target_model(
    model, params: TargetParams, data: TargetData, served: Served | None = None
) -> str | None:
    """Store the weights once: as the served model (its ID returned and tagged), else as a
    checkpoint."""
    if not params.log_model:
        log_checkpoint(model)
        return None
    served = served or Served(params.tta, 1.0, params.threshold)
    config = serving_config(
        params.backbone, params.preprocessing, served.threshold, served.tta, served.temperature
    )
    model_id = log_serving_model(
        model,
        config,
        data.index.loc[data.parts["test"], "path"].iloc[0],
    ).model_id
    mlflow.set_tag(MODEL_ID_TAG, model_id)
    return model_id


def log_lung_field_missing(index: pd.DataFrame, decoded, params: TargetParams) -> None:
    """With lung_crop, the slices used whole because no lung field was found: counted per split and
    listed."""
    if not params.lung_crop:
        return
    missing = np.zeros(len(index), dtype=bool)
    missing[np.searchsorted(decoded.kept, decoded.lung_field_missing)] = True
    mlflow.log_metrics(
        {
            f"n_lung_field_missing_{part}": int((missing & (index["split"] == part)).sum())
            for part in covid_ct.SPLITS
        }
    )
    if missing.any():
        log_table(index.loc[missing, ["file", "split", "label"]], "data/lung_field_missing.csv")
        print(
            f"lung_crop: no lung field found in {int(missing.sum())} slice(s), used whole; see "
            "data/lung_field_missing.csv"
        )
