"""The paper's whole experiment by one command: backbones x {imagenet, hard, soft} x seeds, each
stage a nested MLflow run under one experiment run, finished work reused.

As in MLflow's multistep_workflow example, a stage whose params, code version and inputs match a run
that already FINISHED on the server is not run again, and each stage runs as its entry point does:
every cell is a fresh ``python -m entrypoints.<stage> --param value ...`` process, so TensorFlow's
state and memory never carry from one cell to the next and a crashing cell takes only itself down.
Each cell (a stage run) is an item of one Optuna study on an RDB storage (``mstl.tracking.work``),
so several workers, on one machine or many, share a grid without running a cell twice, and a grid
killed with SIGKILL resumes on rerun: its orphaned runs are marked KILLED and never reused. Hard and
soft Target runs stay nested under their Transition runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd

from mstl import PACKAGE_DIR, defaults
from mstl.data import covid_ct
from mstl.data.images import IMAGE_SUFFIXES
from mstl.data.labelled import labelled_files
from mstl.data.preprocessing import Preprocessing
from mstl.models import PAPER_BACKBONES, get_backbone
from mstl.soft_labels.search import fold_scores, parse_k_values
from mstl.stages.cli import RUN_ID_FILE_ENV, RUN_TAGS_ENV, argv_for, comma_items
from mstl.stages.evaluate import EvaluateParams, external_evaluations
from mstl.stages.prepare import PrepareParams, export_key
from mstl.stages.soft_labels import SoftLabelParams
from mstl.stages.target import HASH_COLUMNS, NOT_LOGGED, TargetParams
from mstl.stages.transition import TransitionParams
from mstl.tracking import (
    code_version,
    find_finished_run,
    log_params,
    log_table,
    start_stage_run,
    tracking_uri,
)
from mstl.tracking.work import HEARTBEAT_SECONDS, heartbeat_storage, run_shared, trials_by_item
from mstl.training.cost import (
    PAPER_TRANSITION_SLICES,
    CellWork,
    Measurements,
    PlanCost,
    measure,
    plan_cost,
)
from mstl.training.fit import set_threads

STRATEGIES = ("imagenet", "hard", "soft")
IQ_OTH_NCCD = "iq-oth-nccd"
# nodule against normal: every slice used, the classes nearly balanced, and a pathology-against-
# normal task on lung CT like the Target's (docs/choices.md); the folder names are the dataset's,
# "Bengin" included
IQ_OTH_NCCD_LABELS = "bengin cases=1,malignant cases=1,normal cases=0"
PROFILES = {
    # the paper's settings, for a GPU machine
    "paper": {
        "backbones": ",".join(PAPER_BACKBONES),
        "image_size": 224,
        "epochs": 60,
        "group_by": "patient",
        "soft_backbone": "inceptionv3",
        "soft_folds": 10,
        "transition_patience": 0,  # every epoch, as the Target's
    },
    # the paper's settings where a 2-core CPU allows: MobileNet-0.25 (the one backbone with ImageNet
    # weights here, also the soft-label features), 224 px, 60 epochs; Transition on IQ-OTH/NCCD,
    # stopped after 20 epochs without a better validation accuracy (docs/choices.md)
    "cpu": {
        "backbones": "mobilenet_025",
        "image_size": 224,
        "epochs": 60,
        "group_by": "patient",  # IQ-OTH/NCCD's pseudo-patients: its near-duplicate groups
        "soft_backbone": "mobilenet_025",
        "soft_folds": 10,
        "transition_patience": 20,
    },
}


@dataclass(frozen=True)
class ExperimentParams:
    """Parameters of `-e experiment`; empty or 0 means "the profile's"."""

    profile: str = "cpu"
    backbones: str = ""
    strategies: str = "imagenet,hard,soft"
    seeds: str = "0"
    split: str = defaults.SPLIT
    image_size: int = 0
    epochs: int = 0
    # the Source: imagenet (the paper's), or none, random initialisation for trying the grid's
    # networks where their ImageNet weights cannot be downloaded (its baseline cells are then
    # tagged strategy=scratch, not imagenet)
    weights: str = defaults.WEIGHTS
    data_root: str = defaults.DATA_ROOT
    transition_dicom_root: str = ""
    transition_slices_root: str = ""
    transition_labels_csv: str = ""
    transition_label_map: str = ""
    transition_selection: str = "lung"  # prepare_transition's: lung, nodule or lung+nodule
    transition_nodules_csv: str = ""  # e.g. the nodules.csv of `mstl.data.download spie-aapm`
    transition_group_by: str = ""
    transition_patience: int = -1  # -1: the profile's; 0: every epoch
    soft_feature_backbone: str = ""
    soft_k_values: str = defaults.K_VALUES
    soft_folds: int = 0
    export_dir: str = defaults.EXPORT_DIR
    cache_dir: str = defaults.CACHE_DIR
    storage: str = ""  # Optuna RDB URL shared by the grid's workers (default: sqlite in cache_dir)
    heartbeat_seconds: int = HEARTBEAT_SECONDS
    # TensorFlow threads of this worker's cells (0: its default); not part of the grid's identity
    threads: int = 0
    deterministic: bool = True
    lung_crop: bool = False
    intensity: str = "none"
    # labelled sets from other hospitals, each Target cell evaluated on each as a nested
    # `evaluate` run: a comma list of folders (a sub-folder per class) or labels CSVs
    external_sets: str = ""
    external_positive_class: str = "COVID"  # the positive sub-folder of each folder set
    external_patient_pattern: str = ""  # evaluate's patient_pattern, for folder sets
    # print the measured plan (cells, images, hours, memory), record it in a plan run, run no cell
    dry_run: bool = False
    # how many workers the plan's wall time assumes (start them yourself; `make experiment`: 2)
    workers: int = 1
    experiment: str = defaults.EXPERIMENT_NAME

    def resolved(self) -> ExperimentParams:
        """Fill what the profile decides; on the cpu profile the transition source defaults to
        IQ-OTH/NCCD under data_root, nodule (benign or malignant) against normal."""
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r}; use one of {', '.join(PROFILES)}")
        p = PROFILES[self.profile]
        out = replace(
            self,
            backbones=self.backbones or p["backbones"],
            image_size=self.image_size or p["image_size"],
            epochs=self.epochs or p["epochs"],
            transition_group_by=self.transition_group_by or p["group_by"],
            soft_feature_backbone=self.soft_feature_backbone or p["soft_backbone"],
            soft_folds=self.soft_folds or p["soft_folds"],
            transition_patience=p["transition_patience"]
            if self.transition_patience == -1
            else self.transition_patience,
        )
        if out.transition_patience < 0:
            raise ValueError(
                "transition_patience must be -1 (the profile's), 0 (every epoch) or more, got "
                f"{self.transition_patience}"
            )
        needs_transition = any(s in ("hard", "soft") for s in out.strategy_list())
        if needs_transition and not (out.transition_dicom_root or out.transition_slices_root):
            if self.profile != "cpu":
                if not self.dry_run:  # a dry run plans with the paper's Transition size
                    raise ValueError(
                        "hard/soft strategies need transition_dicom_root or transition_slices_root"
                    )
                return out.checked()
            out = replace(
                out,
                transition_slices_root=str(Path(out.data_root) / IQ_OTH_NCCD),
                transition_label_map=IQ_OTH_NCCD_LABELS,
            )
        return out.checked()

    def checked(self) -> ExperimentParams:
        """Fail on a value no cell could run with, before any cell."""
        if self.weights not in ("imagenet", "none"):
            raise ValueError(f"weights must be imagenet or none, got {self.weights!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        for name in self.backbone_list():
            get_backbone(name)
        self.split_list()
        self.external_list()
        # an unknown intensity fails before any cell
        Preprocessing(self.image_size, self.lung_crop, self.intensity)
        return self

    def external_list(self) -> list[EvaluateParams]:
        """One `evaluate` template per external set (its model filled per Target cell); checked:
        present, except in a dry run, which plans with sets it may not have yet."""
        return external_evaluations(
            self.external_sets,
            self.external_positive_class,
            self.external_patient_pattern,
            must_exist=not self.dry_run,
        )

    def strategy_list(self) -> list[str]:
        items = comma_items(self.strategies)
        unknown = set(items) - set(STRATEGIES)
        if unknown or not items:
            raise ValueError(
                f"strategies must be a comma list of {STRATEGIES}, got {self.strategies!r}"
            )
        return items

    def backbone_list(self) -> list[str]:
        return comma_items(self.backbones)

    def split_list(self) -> list[str]:
        """The Target splits; one grid over several shares its Transition and soft-label cells
        between them."""
        items = comma_items(self.split)
        unknown = [s for s in items if s not in covid_ct.SPLIT_MODES]
        if unknown or not items or len(set(items)) != len(items):
            raise ValueError(
                f"split must be a comma list of distinct {covid_ct.SPLIT_MODES}, got {self.split!r}"
            )
        return items

    def seed_list(self) -> list[int]:
        try:
            return [int(s) for s in comma_items(str(self.seeds))]
        except ValueError:
            raise ValueError(
                f"seeds must be whole numbers separated by commas, got {self.seeds!r}"
            ) from None


@dataclass(frozen=True)
class Cell:
    """One stage run of the grid: its key, its entry point, the cells whose runs it needs, and how
    to make its parameters and the inputs that identify it besides them."""

    key: str
    stage: str
    needs: tuple[str, ...]
    make: Callable[[dict[str, str]], tuple[object, dict]]  # run IDs of needs -> (params, inputs)
    parent: str = ""  # the cell whose run this cell's run nests under (empty: the grid run)


def plan(p: ExperimentParams, data_hash: str, file_hashes: str = "") -> list[Cell]:
    """Every cell of the grid, each after the cells it needs (the order one worker would run them
    in). ``data_hash`` is COVID-CT's combined hash, ``file_hashes`` the CSV of its files' hashes
    handed to every Target cell (empty: each hashes the files itself)."""
    strategies = p.strategy_list()
    cells = [prepare_cell(p)] if any(s != "imagenet" for s in strategies) else []
    for seed in p.seed_list():
        if "soft" in strategies:
            cells.append(soft_labels_cell(p, seed))
        for backbone in p.backbone_list():
            common = dict(
                backbone=backbone,
                weights=p.weights,
                image_size=p.image_size,
                lung_crop=p.lung_crop,
                intensity=p.intensity,
                epochs=p.epochs,
                seed=seed,
                deterministic=p.deterministic,
                # the cells share decoded slices and frozen features
                array_cache_dir=str(Path(p.cache_dir) / "arrays"),
            )
            for strategy in strategies:
                name = f"{backbone}/{strategy}/s{seed}"
                needs: tuple[str, ...] = ()
                if strategy != "imagenet":
                    cells.append(transition_cell(p, name, strategy, common))
                    needs = (f"transition/{name}",)
                for split in p.split_list():  # one Transition serves the Target runs of every split
                    target = TargetParams(
                        data_root=p.data_root, split=split, file_hashes=file_hashes, **common
                    )
                    key = f"target/{split}/{name}"
                    cells.append(target_cell(key, needs, target, data_hash))
                    cells += [evaluate_cell(key, e, seed) for e in p.external_list()]
    return cells


def evaluate_cell(target_key: str, external: EvaluateParams, seed: int) -> Cell:
    """A Target cell's model on one external set, nested under the Target run (as `compare` and
    `promote` read it: the latest evaluation of that model on that data)."""

    def make(ids: dict[str, str]) -> tuple[object, dict]:
        return replace(external, model_uri=f"runs:/{ids[target_key]}", seed=seed), {}

    key = f"evaluate/{external.name()}/{target_key.removeprefix('target/')}"
    return Cell(key, "evaluate", (target_key,), make, parent=target_key)


def prepare_cell(p: ExperimentParams) -> Cell:
    """The one prepare_transition cell: the Transition slices every hard and soft cell uses (in a
    dry run, unchecked and never made: its source may not exist yet, and is not hashed)."""
    if p.dry_run:
        return Cell("prepare_transition", "prepare_transition", (), not_in_a_dry_run)
    prepare = PrepareParams(
        dicom_root=p.transition_dicom_root,
        slices_root=p.transition_slices_root,
        labels_csv=p.transition_labels_csv,
        label_map=p.transition_label_map,
        selection=p.transition_selection,
        nodules_csv=p.transition_nodules_csv,
        export_dir=p.export_dir,
    )
    prepare.validate()
    inputs = {"export_key": export_key(prepare)}
    return Cell("prepare_transition", "prepare_transition", (), lambda ids: (prepare, inputs))


def not_in_a_dry_run(ids: dict[str, str]) -> tuple[object, dict]:
    raise RuntimeError("a dry run plans the prepare_transition cell but never runs it")


def soft_labels_cell(p: ExperimentParams, seed: int) -> Cell:
    """The soft labels of one seed, clustered from the prepared slices."""

    def make(ids: dict[str, str]) -> tuple[object, dict]:
        params = SoftLabelParams(
            manifest=ids["prepare_transition"],
            feature_backbone=p.soft_feature_backbone,
            weights=p.weights,
            k_values=p.soft_k_values,
            folds=p.soft_folds,
            seed=seed,
            cache_dir=p.cache_dir,
            log_features=False,
            storage=p.storage,
            heartbeat_seconds=p.heartbeat_seconds,
        )
        return params, {}

    return Cell(f"soft_labels/s{seed}", "soft_labels", ("prepare_transition",), make)


def transition_cell(p: ExperimentParams, name: str, strategy: str, common: dict) -> Cell:
    """A hard or soft Transition cell (``name`` is backbone/strategy/seed)."""
    soft = f"soft_labels/s{common['seed']}"
    needs = ("prepare_transition",) + ((soft,) if strategy == "soft" else ())

    def make(ids: dict[str, str]) -> tuple[object, dict]:
        params = TransitionParams(
            manifest=ids["prepare_transition"],
            strategy=strategy,
            labels=ids.get(soft, ""),
            group_by=p.transition_group_by,
            patience=p.transition_patience,
            **common,
        )
        return params, {}

    return Cell(f"transition/{name}", "transition", needs, make)


def target_cell(key: str, needs: tuple[str, ...], target: TargetParams, data_hash: str) -> Cell:
    """A Target cell, started from its Transition cell's run when it needs one."""

    def make(ids: dict[str, str]) -> tuple[object, dict]:
        params = replace(target, init_from=ids[needs[0]]) if needs else target
        return params, {"data_sha256": data_hash}

    return Cell(key, "target", needs, make)


def hash_covid_ct(data_root: str, folder: Path) -> tuple[str, str]:
    """COVID-CT's file hashes, read once per grid: their combined hash (the Target cells' input)
    and a CSV of path,sha256 in ``folder`` that every Target cell reads instead of the files."""
    paths = covid_ct.index_images(data_root)["path"]
    hashes = covid_ct.file_sha256s(paths)
    csv = folder / "covid-ct-sha256.csv"
    pd.DataFrame(dict(zip(HASH_COLUMNS, (paths, hashes), strict=True))).to_csv(csv, index=False)
    return covid_ct.combined_sha256(hashes), str(csv.resolve())


# how one worker runs, not what the grid is: workers that differ only in these share one grid
WORKER_ONLY = ("storage", "heartbeat_seconds", "threads", "experiment", "dry_run", "workers")


def grid_study_name(p: ExperimentParams, experiment_id: str) -> str:
    """One study per grid, experiment and code version: workers that agree on all three share the
    work."""
    shaping = {k: v for k, v in asdict(p).items() if k not in WORKER_ONLY}
    digest = hashlib.sha256(
        json.dumps([shaping, experiment_id, code_version()], sort_keys=True, default=str).encode()
    )
    return f"grid-{digest.hexdigest()[:16]}"


def cell_runs(client, experiment_id: str, study_name: str, cell: str, status: str) -> list:
    """The runs of one grid cell (by any worker) in ``status``."""
    return client.search_runs(
        [experiment_id],
        f"tags.`mstl.grid` = '{study_name}' and tags.`mstl.grid_cell` = '{cell}' and "
        f"attributes.status = '{status}'",
    )


def kill_orphans(
    client, experiment_id: str, study_name: str, cell: str, trial_number: int
) -> list[str]:
    """Runs of ``cell`` left RUNNING by a dead worker (an earlier trial of it), and their RUNNING
    ancestors (the dead worker's experiment run), are marked KILLED: visible as such in the UI,
    never reused."""
    killed = []
    for run in cell_runs(client, experiment_id, study_name, cell, "RUNNING"):
        if run.data.tags.get("mstl.grid_trial") == str(trial_number):
            continue
        current = run
        while current is not None and current.info.status == "RUNNING":
            client.set_terminated(current.info.run_id, "KILLED")
            killed.append(current.info.run_id)
            parent = current.data.tags.get("mlflow.parentRunId")
            current = client.get_run(parent) if parent else None
    if killed:
        print(
            f"marked {len(killed)} orphaned run(s) of {cell} KILLED: {', '.join(killed)}",
            flush=True,
        )
    return killed


class CellFailed(RuntimeError):
    """A grid cell's process ended without a run: it crashed, or was killed."""


def exit_status(returncode: int) -> str:
    """``exit code 1``, or ``killed by SIGKILL`` for a process a signal ended."""
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def cell_command(stage: str, params) -> list[str]:
    """The cell as `mlflow run . -e <stage>` runs it: its entry point, every parameter given."""
    return [sys.executable, "-m", f"entrypoints.{stage}", *argv_for(params)]


def cell_environment(tags: dict[str, str], run_id_file: Path, threads: int) -> dict[str, str]:
    """This process's environment for a cell's: the same tracking server, the grid's tags (its run
    as the parent among them), where to write the run ID, and this worker's TensorFlow threads."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME")
    }
    # entrypoints/ sits beside the package, wherever the worker was started from
    path = [str(PACKAGE_DIR.parent), *filter(None, [env.get("PYTHONPATH")])]
    env |= {
        "MLFLOW_TRACKING_URI": tracking_uri(),
        RUN_TAGS_ENV: json.dumps(tags),
        RUN_ID_FILE_ENV: str(run_id_file),
        "PYTHONPATH": os.pathsep.join(path),
        "PYTHONUNBUFFERED": "1",  # the cell's progress shows as it happens
    }
    if threads:
        env |= {"TF_NUM_INTRAOP_THREADS": str(threads), "TF_NUM_INTEROP_THREADS": str(threads)}
    return env


def run_cell(key: str, command: list[str], tags: dict[str, str], threads: int = 0) -> str:
    """Run one cell's process, its output streaming to this one's; return the run ID it wrote.
    Raises CellFailed, naming the cell, when the process fails or writes no run ID."""
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryDirectory(prefix="mstl-cell-") as tmp:
        run_id_file = Path(tmp) / "run_id"
        done = subprocess.run(command, env=cell_environment(tags, run_id_file, threads))
        run_id = run_id_file.read_text().strip() if run_id_file.is_file() else ""
    if done.returncode or not run_id:
        status = exit_status(done.returncode) if done.returncode else "no run ID written"
        raise CellFailed(f"grid cell {key} failed ({status}); its output is above")
    return run_id


@dataclass
class Worker:
    """One worker of a grid: the cells, the study they are shared through, and what it ran."""

    cells: dict[str, Cell]
    study: optuna.Study
    grid_run: mlflow.ActiveRun
    threads: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"run": 0, "reused": 0})

    def __post_init__(self) -> None:
        self.client = mlflow.MlflowClient(tracking_uri())
        self.experiment_id = self.grid_run.info.experiment_id
        # the cells' runs go to the grid run's experiment (`mlflow run --experiment-name` too)
        self.experiment_name = self.client.get_experiment(self.experiment_id).name

    def run_ids(self) -> dict[str, str]:
        """The run of every complete cell, whichever worker ran it."""
        ids = {}
        for key, trials in trials_by_item(self.study, "cell").items():
            complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
            if complete:
                ids[key] = complete[0].user_attrs["run_id"]
        return ids

    def evaluate(self, trial: optuna.Trial, key: str) -> float:
        """One cell: a finished run with its params, code version and inputs is reused, else the
        cell is run in a process of its own."""
        cell, name = self.cells[key], self.study.study_name
        kill_orphans(self.client, self.experiment_id, name, key, trial.number)
        ids = self.run_ids()
        params, inputs = cell.make(ids)
        identity = {k: v for k, v in asdict(params).items() if k not in NOT_LOGGED}
        found = find_finished_run(cell.stage, identity | inputs, self.experiment_id)
        position = f"[{len(ids) + 1}/{len(self.cells)}]"
        if found:
            print(f"{position} {key}: reusing finished run {found}", flush=True)
            run_id = found
        else:
            print(f"{position} {key}: running", flush=True)
            parent = ids[cell.parent] if cell.parent else self.grid_run.info.run_id
            run_id = self.launch(cell, params, trial.number, parent)
        self.counts["reused" if found else "run"] += 1
        trial.set_user_attr("run_id", run_id)
        trial.set_user_attr("reused", bool(found))
        return 0.0

    def launch(self, cell: Cell, params, trial_number: int, parent: str) -> str:
        """Run ``cell`` in a fresh process, nested under ``parent`` (the grid run, or the run of the
        cell it evaluates) and tagged as its cell; a failed cell's runs left RUNNING (a killed
        process) are marked FAILED."""
        name = self.study.study_name
        tags = {
            "mlflow.parentRunId": parent,
            "mstl.grid": name,
            "mstl.grid_cell": cell.key,
            "mstl.grid_trial": str(trial_number),
        }
        command = cell_command(cell.stage, replace(params, experiment=self.experiment_name))
        try:
            return run_cell(cell.key, command, tags, self.threads)
        except CellFailed:
            for run in cell_runs(self.client, self.experiment_id, name, cell.key, "RUNNING"):
                if run.data.tags.get("mstl.grid_trial") == str(trial_number):
                    self.client.set_terminated(run.info.run_id, "FAILED")
            raise


# the probe's batches: at most this many images each, one warm-up and this many timed per part
# (about 2 min for the paper's four backbones at 224 px on a 2-core CPU, docs/benchmarks.md)
PROBE_BATCH = 8
PROBE_BATCHES = 1
KMEANS_PROBE_ROWS = 256


def transition_size(p: ExperimentParams) -> tuple[int, str]:
    """The Transition slices the plan assumes before prepare_transition has run, and why."""
    root = p.transition_slices_root or p.transition_dicom_root
    if not root or not Path(root).is_dir():
        where = f"nothing at {root}" if root else "no Transition source given"
        return PAPER_TRANSITION_SLICES, (
            f"Transition: the paper's {PAPER_TRANSITION_SLICES:,} SPIE-AAPM slices ({where})"
        )
    files = [f for f in Path(root).rglob("*") if f.is_file()]
    if p.transition_slices_root:
        n = sum(f.suffix.lower() in IMAGE_SUFFIXES for f in files)
        return n, f"Transition: {n:,} image files under {root} (near-duplicates dropped later)"
    return len(files), (
        f"Transition: {len(files):,} files under {root}, every DICOM slice (the selection keeps "
        "fewer: the paper kept 10,176 of SPIE-AAPM's 22,489)"
    )


def target_sizes(p: ExperimentParams) -> tuple[dict[str, tuple[int, ...]], str]:
    """(train, val, test) images per Target split (the first seed's), or the paper's Table II
    counts where COVID-CT is not there yet."""
    seed = p.seed_list()[0]
    try:
        sizes = {}
        for split in p.split_list():
            counts = covid_ct.load_split(p.data_root, split, seed)["split"].value_counts()
            sizes[split] = tuple(int(counts.get(part, 0)) for part in covid_ct.SPLITS)
        return sizes, f"Target: COVID-CT under {p.data_root}, seed {seed}'s split"
    except FileNotFoundError:
        counts = covid_ct.PAPER_COUNTS.values()
        paper = tuple(sum(c[part] for c in counts) for part in covid_ct.SPLITS)
        return dict.fromkeys(p.split_list(), paper), (
            f"Target: no COVID-CT under {p.data_root}; the paper's Table II counts {paper}"
        )


def external_size(external: EvaluateParams) -> int:
    """The images an external set holds (0 when it is not there yet, in a dry run)."""
    if not Path(external.images_root or external.labels_csv).exists():
        return 0
    return len(
        labelled_files(
            external.images_root,
            external.positive_class,
            external.labels_csv,
            external.patient_pattern,
        )
    )


def evaluate_work(cell: Cell, cells: dict[str, Cell]) -> CellWork:
    """An evaluate cell: the network of the Target cell it evaluates, over the external set."""
    target, _ = cells[cell.parent].make(dict.fromkeys(cells[cell.parent].needs, "planned"))
    external, _ = cell.make({cell.parent: "planned"})
    return CellWork(
        cell.stage, target.backbone, target.image_size, n_slices=external_size(external)
    )


def cell_work(cell: Cell, sizes: dict[str, tuple[int, ...]], n_transition: int) -> CellWork:
    """What ``cell`` will process, read from the parameters it would run with."""
    if cell.stage == "prepare_transition":
        return CellWork(cell.stage, n_slices=n_transition)
    params, _ = cell.make(dict.fromkeys(cell.needs, "planned"))
    if cell.stage == "soft_labels":
        return CellWork(
            cell.stage, params.feature_backbone, params.image_size, n_slices=n_transition
        )
    if cell.stage == "transition":
        n_val = round(params.val_fraction * n_transition)
        sizes_fit: tuple[int, ...] = (n_transition - n_val, n_val, 0)
    else:
        sizes_fit = sizes[params.split]
    return CellWork(cell.stage, params.backbone, params.image_size, params.epochs, *sizes_fit)


def kmeans_seconds_per_slice(d: int, p: ExperimentParams, rows: int = KMEANS_PROBE_ROWS) -> float:
    """The soft-label search (every k, ``soft_folds`` fits each on all but one fold), per slice:
    timed as a 2-fold search on ``rows`` random ``d``-value features and scaled linearly in the
    rows each fit sees, which undercounts the held-out silhouette (its cost grows with the square
    of a fold's size)."""
    x = np.random.default_rng(0).standard_normal((rows, d), dtype=np.float32)
    start = time.perf_counter()
    for k in parse_k_values(p.soft_k_values):
        fold_scores(x, k, "silhouette", 2, 0)
    per_fit_row = (time.perf_counter() - start) / rows  # 2 fits of rows / 2 each, per k
    return per_fit_row * (p.soft_folds - 1)  # folds fits of (folds - 1) / folds of the slices


def measure_grid(p: ExperimentParams, work: list[CellWork]) -> Measurements:
    """Probe every network the cells will run (in a process of its own) and the soft-label
    search."""
    fits = {(w.backbone, w.image_size) for w in work if w.stage in ("transition", "target")}
    soft = {(w.backbone, w.image_size) for w in work if w.stage == "soft_labels"}
    entries = [(b, s, False) for b, s in sorted(fits)] + [
        (b, s, True) for b, s in sorted(soft - fits)
    ]
    m = measure(entries, min(PROBE_BATCH, defaults.BATCH_SIZE), PROBE_BATCHES, p.threads)
    if soft:
        d = m.get(*sorted(soft)[0]).feature_values
        m = replace(m, kmeans_seconds_per_slice=kmeans_seconds_per_slice(d, p))
    return m


def plan_grid(p: ExperimentParams, cells: list[Cell]) -> tuple[PlanCost, Measurements]:
    """The measured plan of ``cells``, printed before any of them runs."""
    sizes, target_note = target_sizes(p)
    n_transition, transition_note = transition_size(p)
    by_key = {cell.key: cell for cell in cells}
    work = [
        evaluate_work(cell, by_key)
        if cell.stage == "evaluate"
        else cell_work(cell, sizes, n_transition)
        for cell in cells
    ]
    networks = {(w.backbone, w.image_size) for w in work if w.backbone}
    print(f"measuring {len(networks)} network(s) on this device", flush=True)
    m = measure_grid(p, work)
    notes = [
        transition_note,
        target_note,
        f"measured on {m.device}, TensorFlow threads {p.threads or 'default'}, batches of "
        f"{min(PROBE_BATCH, defaults.BATCH_SIZE)}, random weights (the same arithmetic), in "
        f"{m.probe_seconds:.0f} s at load {m.load_average:.1f}; each cell starts a process "
        f"({m.startup_seconds:.1f} s here)",
        "every cell counted: finished cells found on the tracking server are reused for free",
        "prepare_transition priced at 114 slices/s (docs/benchmarks.md), not probed",
    ]
    if p.transition_patience:
        notes.append(
            f"Transition: all {p.epochs} epochs counted; transition_patience="
            f"{p.transition_patience} may stop it sooner"
        )
    if p.workers > 1:
        notes.append(f"{p.workers} workers on one machine slow each other: not counted")
    cost = plan_cost(work, m, p.workers, notes)
    print(f"plan of the {p.profile} grid:\n{cost.text()}", flush=True)
    return cost, m


def log_plan(cost: PlanCost, m: Measurements) -> None:
    """The plan on the active run: its table, text, the probe's throughputs and the totals."""
    log_table(cost.table, "plan/cost.csv")
    log_table(pd.DataFrame([asdict(b) for b in m.backbones.values()]), "plan/throughput.csv")
    mlflow.log_text(cost.text(), "plan/plan.txt")
    mlflow.log_metrics(
        cost.metrics() | {"probe_seconds": m.probe_seconds, "startup_seconds": m.startup_seconds}
    )


def run_dry(p: ExperimentParams) -> str:
    """Plan the grid, print and record its cost in a run of its own (tag ``stage=experiment_plan``,
    so no grid or report mistakes it for a grid), and run no cell; returns that run's ID."""
    cells = plan(p, "not hashed in a dry run")
    cost, m = plan_grid(p, cells)
    with start_stage_run(p.experiment, f"plan-{p.profile}") as run:
        mlflow.set_tags({"stage": "experiment_plan", "profile": p.profile})
        log_params(
            {k: v for k, v in asdict(p).items() if k not in ("experiment", "storage")}
            | {"n_cells": len(cells)}
        )
        log_plan(cost, m)
        print(f"dry run: no cell was run; the plan is recorded in run {run.info.run_id}")
        return run.info.run_id


def run_experiment(params: ExperimentParams) -> str:
    """One worker of the grid. Any number of workers (here or on other machines, sharing ``storage``
    and the tracking server) split the cells between them: each cell is an item of one Optuna
    study, run in a process of its own. It first measures and logs the plan; with ``dry_run`` it
    stops there."""
    p = params.resolved()
    set_threads(p.threads)
    if p.dry_run:
        return run_dry(p)
    with tempfile.TemporaryDirectory(prefix="mstl-grid-") as work:
        hashes = hash_covid_ct(p.data_root, Path(work))
        with start_stage_run(p.experiment, f"experiment-{p.profile}") as grid_run:
            cells = {cell.key: cell for cell in plan(p, *hashes)}
            study = open_grid_study(p, grid_run, len(cells))
            log_plan(*plan_grid(p, list(cells.values())))
            worker = Worker(cells, study, grid_run, p.threads)
            done = run_shared(
                worker.study,
                "cell",
                list(cells),
                worker.evaluate,
                ready=lambda key, done: set(cells[key].needs) <= set(done),
                poll_seconds=min(10.0, p.heartbeat_seconds),
            )
            log_grid(worker, done)
            return grid_run.info.run_id


def open_grid_study(p: ExperimentParams, grid_run, n_cells: int) -> optuna.Study:
    """Tag and log the grid run, and create (or join) the grid's study."""
    name = grid_study_name(p, grid_run.info.experiment_id)
    storage = p.storage or f"sqlite:///{(Path(p.cache_dir) / 'optuna.db').resolve()}"
    Path(p.cache_dir).mkdir(parents=True, exist_ok=True)
    mlflow.set_tags({"stage": "experiment", "profile": p.profile, "mstl.grid": name})
    log_params(
        {k: v for k, v in asdict(p).items() if k not in ("experiment", "storage")}
        | {"optuna_storage": storage.split("@")[-1], "grid_study": name, "n_cells": n_cells}
    )
    return optuna.create_study(
        study_name=name,
        storage=heartbeat_storage(storage, p.heartbeat_seconds),
        load_if_exists=True,
    )


def log_grid(worker: Worker, done: dict) -> None:
    """The grid's cells table (each cell's run, whoever ran it), counts and time per stage."""
    cells = worker.cells
    table = pd.DataFrame(
        [
            {
                "cell": key,
                "stage": cells[key].stage,
                "run_id": done[key].user_attrs["run_id"],
                "reused": done[key].user_attrs.get("reused", False),
                "trial": done[key].number,
                "seconds": done[key].duration.total_seconds()
                if done[key].duration
                else float("nan"),
            }
            for key in cells
        ]
    )
    log_table(table, "grid/cells.csv")
    targets = table.loc[table["stage"] == "target", "run_id"].tolist()
    ran = table[~table["reused"]]  # where the grid's time went, per stage (cells run by any worker)
    mlflow.log_metrics(
        {
            "cells": len(cells),
            "cells_run": worker.counts["run"],
            "cells_reused": worker.counts["reused"],
            "target_runs": len(targets),
        }
        | {
            f"seconds_{stage}": float(seconds)
            for stage, seconds in ran.groupby("stage")["seconds"].sum().items()
        }
    )
    print(
        f"experiment: {len(cells)} cells, this worker ran {worker.counts['run']} and reused "
        f"{worker.counts['reused']}; Target runs: {', '.join(t[:8] for t in targets)}",
        flush=True,
    )
