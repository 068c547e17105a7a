"""The paper's whole experiment by one command: backbones x {imagenet, hard, soft} x seeds, each
stage a
nested MLflow run under one experiment run, finished work reused.

As in MLflow's multistep_workflow example, a stage whose params, code version and inputs match a run
that already FINISHED on the server is not run again. Each cell (a stage run) is an item of one
Optuna
study on an RDB storage (``mstl.tracking.work``), so several workers, on one machine or many, share
a grid
without running a cell twice, and a grid killed with SIGKILL resumes on rerun: its orphaned runs are
marked KILLED and never reused. Hard and soft Target runs stay nested under their Transition runs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlflow
import optuna
import pandas as pd

from mstl import defaults
from mstl.data import covid_ct
from mstl.data.preprocessing import Preprocessing
from mstl.models import PAPER_BACKBONES, get_backbone
from mstl.stages.prepare import PrepareParams, export_key, run_prepare
from mstl.stages.soft_labels import SoftLabelParams, run_soft_labels
from mstl.stages.target import TargetParams, run_target
from mstl.stages.transition import TransitionParams, run_transition
from mstl.tracking import (
    code_version,
    find_finished_run,
    log_params,
    log_table,
    run_tags,
    start_stage_run,
    tracking_uri,
)
from mstl.tracking.work import HEARTBEAT_SECONDS, heartbeat_storage, run_shared, trials_by_item
from mstl.training.fit import set_threads

STRATEGIES = ("imagenet", "hard", "soft")
IQ_OTH_NCCD = "iq-oth-nccd"
# nodule against normal: every slice used, the classes nearly balanced, and a pathology-against-
# normal
# task on lung CT like the Target's (docs/choices.md); the folder names are the dataset's, "Bengin"
# included
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
    # weights
    # here, also the soft-label features), 224 px, 60 epochs; Transition on IQ-OTH/NCCD, stopped
    # after 20 epochs
    # without a better validation accuracy (docs/choices.md)
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
    data_root: str = defaults.DATA_ROOT
    transition_dicom_root: str = ""
    transition_slices_root: str = ""
    transition_labels_csv: str = ""
    transition_label_map: str = ""
    transition_group_by: str = ""
    transition_patience: int = -1  # -1: the profile's; 0: every epoch
    soft_feature_backbone: str = ""
    soft_k_values: str = defaults.K_VALUES
    soft_folds: int = 0
    export_dir: str = defaults.EXPORT_DIR
    cache_dir: str = defaults.CACHE_DIR
    storage: str = ""  # Optuna RDB URL shared by the grid's workers (default: sqlite in cache_dir)
    heartbeat_seconds: int = HEARTBEAT_SECONDS
    threads: int = (
        0  # TensorFlow threads of this worker (0: its default); not part of the grid's identity
    )
    deterministic: bool = True
    lung_crop: bool = False
    intensity: str = "none"
    experiment: str = defaults.EXPERIMENT_NAME

    def resolved(self) -> ExperimentParams:
        """Fill what the profile decides; on the cpu profile the transition source defaults to
        IQ-OTH/NCCD
        under data_root, nodule (benign or malignant) against normal."""
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
        for name in out.backbone_list():
            get_backbone(name)
        out.split_list()
        Preprocessing(
            out.image_size, out.lung_crop, out.intensity
        )  # an unknown intensity fails before any cell
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
    """One stage run of the grid: its key, the cells whose runs it needs, and how to make its
    parameters."""

    key: str
    stage: str
    needs: tuple[str, ...]
    make: Callable[
        [dict[str, str]], tuple[object, Callable, dict]
    ]  # run IDs of needs -> (params, runner, inputs)


def plan(p: ExperimentParams, data_hash: str) -> list[Cell]:
    """Every cell of the grid, each after the cells it needs (the order one worker would run them
    in)."""
    strategies, seeds = p.strategy_list(), p.seed_list()
    cells: list[Cell] = []
    if any(s != "imagenet" for s in strategies):
        prepare = PrepareParams(
            dicom_root=p.transition_dicom_root,
            slices_root=p.transition_slices_root,
            labels_csv=p.transition_labels_csv,
            label_map=p.transition_label_map,
            export_dir=p.export_dir,
        )
        prepare.validate()
        key = export_key(prepare)
        cells.append(
            Cell(
                "prepare_transition",
                "prepare_transition",
                (),
                lambda ids: (prepare, run_prepare, {"export_key": key}),
            )
        )
    for seed in seeds:
        if "soft" in strategies:
            cells.append(
                Cell(
                    f"soft_labels/s{seed}",
                    "soft_labels",
                    ("prepare_transition",),
                    lambda ids, seed=seed: (
                        SoftLabelParams(
                            manifest=ids["prepare_transition"],
                            feature_backbone=p.soft_feature_backbone,
                            k_values=p.soft_k_values,
                            folds=p.soft_folds,
                            seed=seed,
                            cache_dir=p.cache_dir,
                            log_features=False,
                            storage=p.storage,
                            heartbeat_seconds=p.heartbeat_seconds,
                        ),
                        run_soft_labels,
                        {},
                    ),
                )
            )
        for backbone in p.backbone_list():
            common = dict(
                backbone=backbone,
                image_size=p.image_size,
                lung_crop=p.lung_crop,
                intensity=p.intensity,
                epochs=p.epochs,
                seed=seed,
                deterministic=p.deterministic,
                array_cache_dir=str(
                    Path(p.cache_dir) / "arrays"
                ),  # the cells share decoded slices and frozen features
            )
            for strategy in strategies:
                name = f"{backbone}/{strategy}/s{seed}"
                needs: tuple[str, ...] = ()
                if strategy != "imagenet":
                    transition_needs = ("prepare_transition",) + (
                        (f"soft_labels/s{seed}",) if strategy == "soft" else ()
                    )
                    cells.append(
                        Cell(
                            f"transition/{name}",
                            "transition",
                            transition_needs,
                            lambda ids, strategy=strategy, seed=seed, common=common: (
                                TransitionParams(
                                    manifest=ids["prepare_transition"],
                                    strategy=strategy,
                                    labels=ids.get(f"soft_labels/s{seed}", ""),
                                    group_by=p.transition_group_by,
                                    patience=p.transition_patience,
                                    **common,
                                ),
                                run_transition,
                                {},
                            ),
                        )
                    )
                    needs = (f"transition/{name}",)
                for split in p.split_list():  # one Transition serves the Target runs of every split
                    cells.append(
                        Cell(
                            f"target/{split}/{name}",
                            "target",
                            needs,
                            lambda ids, needs=needs, common=common, split=split: (
                                TargetParams(
                                    data_root=p.data_root,
                                    split=split,
                                    init_from=ids[needs[0]] if needs else "",
                                    **common,
                                ),
                                run_target,
                                {"data_sha256": data_hash},
                            ),
                        )
                    )
    return cells


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


def kill_orphans(
    client, experiment_id: str, study_name: str, cell: str, trial_number: int
) -> list[str]:
    """Runs of ``cell`` left RUNNING by a dead worker (an earlier trial of it), and their RUNNING
    ancestors
    (the dead worker's experiment run), are marked KILLED: visible as such in the UI, never
    reused."""
    found = client.search_runs(
        [experiment_id],
        f"tags.`mstl.grid` = '{study_name}' and tags.`mstl.grid_cell` = '{cell}' and "
        "attributes.status = 'RUNNING'",
    )
    killed = []
    for run in found:
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


def run_experiment(params: ExperimentParams) -> str:
    """One worker of the grid. Any number of workers (here or on other machines, sharing ``storage``
    and the tracking server) split the cells between them: each cell is an item of one Optuna
    study."""
    p = params.resolved()
    set_threads(p.threads)
    data_hash = covid_ct.files_sha256(covid_ct.index_images(p.data_root)["path"])
    with start_stage_run(p.experiment, f"experiment-{p.profile}") as parent:
        cells = {cell.key: cell for cell in plan(p, data_hash)}
        experiment_id = parent.info.experiment_id
        name = grid_study_name(p, experiment_id)
        storage = p.storage or f"sqlite:///{(Path(p.cache_dir) / 'optuna.db').resolve()}"
        Path(p.cache_dir).mkdir(parents=True, exist_ok=True)
        mlflow.set_tags({"stage": "experiment", "profile": p.profile, "mstl.grid": name})
        log_params(
            {k: v for k, v in asdict(p).items() if k not in ("experiment", "storage")}
            | {"optuna_storage": storage.split("@")[-1], "grid_study": name, "n_cells": len(cells)}
        )
        study = optuna.create_study(
            study_name=name,
            storage=heartbeat_storage(storage, p.heartbeat_seconds),
            load_if_exists=True,
        )
        client = mlflow.MlflowClient(tracking_uri())
        counts = {"run": 0, "reused": 0}

        def run_ids() -> dict[str, str]:
            """The run of every complete cell, whichever worker ran it."""
            ids = {}
            for key, trials in trials_by_item(study, "cell").items():
                complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
                if complete:
                    ids[key] = complete[0].user_attrs["run_id"]
            return ids

        def evaluate(trial: optuna.Trial, key: str) -> float:
            cell = cells[key]
            kill_orphans(client, experiment_id, name, key, trial.number)
            ids = run_ids()
            cell_params, runner, inputs = cell.make(ids)
            match = {k: v for k, v in asdict(cell_params).items() if k != "experiment"} | inputs
            found = find_finished_run(cell.stage, match, experiment_id)
            position = f"[{len(ids) + 1}/{len(cells)}]"
            if found:
                print(f"{position} {key}: reusing finished run {found}", flush=True)
                run_id, counts["reused"] = found, counts["reused"] + 1
            else:
                print(f"{position} {key}: running", flush=True)
                with run_tags(
                    {"mstl.grid": name, "mstl.grid_cell": key, "mstl.grid_trial": str(trial.number)}
                ):
                    run_id = runner(cell_params)
                counts["run"] += 1
            trial.set_user_attr("run_id", run_id)
            trial.set_user_attr("reused", bool(found))
            return 0.0

        done = run_shared(
            study,
            "cell",
            list(cells),
            evaluate,
            ready=lambda key, done: set(cells[key].needs) <= set(done),
            poll_seconds=min(10.0, p.heartbeat_seconds),
        )
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
        ran = table[
            ~table["reused"]
        ]  # where the grid's time went, per stage (cells run by any worker)
        mlflow.log_metrics(
            {
                "cells": len(cells),
                "cells_run": counts["run"],
                "cells_reused": counts["reused"],
                "target_runs": len(targets),
            }
            | {
                f"seconds_{stage}": float(seconds)
                for stage, seconds in ran.groupby("stage")["seconds"].sum().items()
            }
        )
        print(
            f"experiment: {len(cells)} cells, this worker ran {counts['run']} and reused "
            f"{counts['reused']}; "
            f"Target runs: {', '.join(t[:8] for t in targets)}"
        )
        return parent.info.run_id
