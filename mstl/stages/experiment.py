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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import mlflow
import optuna
import pandas as pd

from mstl import PACKAGE_DIR, defaults
from mstl.data import covid_ct
from mstl.data.preprocessing import Preprocessing
from mstl.models import PAPER_BACKBONES, get_backbone
from mstl.stages.cli import RUN_ID_FILE_ENV, RUN_TAGS_ENV, argv_for
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


def comma_items(text: str) -> list[str]:
    """The non-empty, stripped items of a comma list such as ``"imagenet, hard,soft"``."""
    return [item.strip() for item in text.split(",") if item.strip()]


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
                raise ValueError(
                    "hard/soft strategies need transition_dicom_root or transition_slices_root"
                )
            out = replace(
                out,
                transition_slices_root=str(Path(out.data_root) / IQ_OTH_NCCD),
                transition_label_map=IQ_OTH_NCCD_LABELS,
            )
        if out.weights not in ("imagenet", "none"):
            raise ValueError(f"weights must be imagenet or none, got {self.weights!r}")
        for name in out.backbone_list():
            get_backbone(name)
        out.split_list()
        # an unknown intensity fails before any cell
        Preprocessing(out.image_size, out.lung_crop, out.intensity)
        return out

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
                    cells.append(target_cell(f"target/{split}/{name}", needs, target, data_hash))
    return cells


def prepare_cell(p: ExperimentParams) -> Cell:
    """The one prepare_transition cell: the Transition slices every hard and soft cell uses."""
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
WORKER_ONLY = ("storage", "heartbeat_seconds", "threads", "experiment")


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
            run_id = self.launch(cell, params, trial.number)
        self.counts["reused" if found else "run"] += 1
        trial.set_user_attr("run_id", run_id)
        trial.set_user_attr("reused", bool(found))
        return 0.0

    def launch(self, cell: Cell, params, trial_number: int) -> str:
        """Run ``cell`` in a fresh process, nested under the grid run and tagged as its cell; a
        failed cell's runs left RUNNING (a killed process) are marked FAILED."""
        name = self.study.study_name
        tags = {
            "mlflow.parentRunId": self.grid_run.info.run_id,
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


def run_experiment(params: ExperimentParams) -> str:
    """One worker of the grid. Any number of workers (here or on other machines, sharing ``storage``
    and the tracking server) split the cells between them: each cell is an item of one Optuna
    study, run in a process of its own."""
    p = params.resolved()
    set_threads(p.threads)
    with tempfile.TemporaryDirectory(prefix="mstl-grid-") as work:
        hashes = hash_covid_ct(p.data_root, Path(work))
        with start_stage_run(p.experiment, f"experiment-{p.profile}") as grid_run:
            cells = {cell.key: cell for cell in plan(p, *hashes)}
            study = open_grid_study(p, grid_run, len(cells))
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
