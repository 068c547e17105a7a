"""The paper's whole experiment by one command: backbones x {imagenet, hard, soft} x seeds, each stage a
nested MLflow run under one experiment run, finished work reused.

As in MLflow's multistep_workflow example, a stage whose params, code version and inputs match a run
that already FINISHED on the server is not run again, so a killed grid picks up where it stopped.
Hard and soft Target runs stay nested under their Transition runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlflow

from mstl import defaults
from mstl.data import covid_ct
from mstl.dicom.prepare import PrepareParams, export_key, run_prepare
from mstl.models import PAPER_BACKBONES, get_backbone
from mstl.soft_labels.stage import SoftLabelParams, run_soft_labels
from mstl.tracking import find_finished_run, log_params, start_stage_run
from mstl.training.target import TargetParams, run_target
from mstl.training.transition import TransitionParams, run_transition

STRATEGIES = ("imagenet", "hard", "soft")
PROFILES = {
    # the paper's settings, for a GPU machine
    "paper": {"backbones": ",".join(PAPER_BACKBONES), "image_size": 224, "epochs": 60, "group_by": "patient",
              "soft_backbone": "inceptionv3", "soft_folds": 10},
    # a complete, honest miniature for a laptop CPU: MobileNet-0.25 (the ImageNet weights here), small images
    "cpu": {"backbones": "mobilenet_025", "image_size": 96, "epochs": 10, "group_by": "series",
            "soft_backbone": "mobilenet_025", "soft_folds": 5},
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
    data_root: str = defaults.DATA_ROOT
    transition_dicom_root: str = ""
    transition_slices_root: str = ""
    transition_labels_csv: str = ""
    transition_label_map: str = ""
    transition_group_by: str = ""
    soft_feature_backbone: str = ""
    soft_k_values: str = defaults.K_VALUES
    soft_folds: int = 0
    export_dir: str = defaults.EXPORT_DIR
    cache_dir: str = defaults.CACHE_DIR
    experiment: str = defaults.EXPERIMENT_NAME

    def resolved(self) -> "ExperimentParams":
        """Fill what the profile decides; on the cpu profile the transition source defaults to the
        Lung-PET-CT-Dx sample under data_root with its slice labels."""
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
        )
        needs_transition = any(s in ("hard", "soft") for s in out.strategy_list())
        if needs_transition and not (out.transition_dicom_root or out.transition_slices_root):
            if self.profile != "cpu":
                raise ValueError("hard/soft strategies need transition_dicom_root or transition_slices_root")
            sample = Path(out.data_root) / "lung-pet-ct-dx"
            out = replace(out, transition_dicom_root=str(sample), transition_labels_csv=str(sample / "slice_labels.csv"),
                          transition_label_map="tumour=1,no_tumour=0")
        for name in out.backbone_list():
            get_backbone(name)
        return out

    def strategy_list(self) -> list[str]:
        items = [s.strip() for s in self.strategies.split(",") if s.strip()]
        unknown = set(items) - set(STRATEGIES)
        if unknown or not items:
            raise ValueError(f"strategies must be a comma list of {STRATEGIES}, got {self.strategies!r}")
        return items

    def backbone_list(self) -> list[str]:
        return [b.strip() for b in self.backbones.split(",") if b.strip()]

    def seed_list(self) -> list[int]:
        try:
            return [int(s) for s in str(self.seeds).split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"seeds must be whole numbers separated by commas, got {self.seeds!r}") from None


class Grid:
    """Runs (or reuses) stage runs in order, printing which cell is running and how many are done."""

    def __init__(self, total: int, experiment_id: str):
        self.total, self.done, self.reused, self.experiment_id = total, 0, 0, experiment_id

    def step(self, stage: str, what: str, params, runner, inputs: dict | None = None) -> str:
        self.done += 1
        match = {k: v for k, v in asdict(params).items() if k != "experiment"} | (inputs or {})
        found = find_finished_run(stage, match, self.experiment_id)
        if found:
            self.reused += 1
            print(f"[{self.done}/{self.total}] {stage} {what}: reusing finished run {found}", flush=True)
            return found
        print(f"[{self.done}/{self.total}] {stage} {what}: running", flush=True)
        return runner(params)


def run_experiment(params: ExperimentParams) -> str:
    p = params.resolved()
    strategies, backbones, seeds = p.strategy_list(), p.backbone_list(), p.seed_list()
    mstl_strategies = [s for s in strategies if s != "imagenet"]
    total = (1 if mstl_strategies else 0) + len(seeds) * (
        ("soft" in strategies) + len(backbones) * (len(strategies) + len(mstl_strategies)))
    with start_stage_run(p.experiment, f"experiment-{p.profile}") as parent:
        mlflow.set_tags({"stage": "experiment", "profile": p.profile})
        log_params({k: v for k, v in asdict(p).items() if k != "experiment"})
        grid = Grid(total, parent.info.experiment_id)
        manifest = None
        if mstl_strategies:
            prepare = PrepareParams(dicom_root=p.transition_dicom_root, slices_root=p.transition_slices_root,
                                    labels_csv=p.transition_labels_csv, label_map=p.transition_label_map,
                                    export_dir=p.export_dir)
            prepare.validate()
            manifest = grid.step("prepare_transition", "(shared)", prepare, run_prepare,
                                 {"export_key": export_key(prepare)})
        data_hash = covid_ct.files_sha256(covid_ct.index_images(p.data_root)["path"])
        targets = []
        for seed in seeds:
            labels = None
            if "soft" in strategies:
                soft = SoftLabelParams(manifest=manifest, feature_backbone=p.soft_feature_backbone,
                                       k_values=p.soft_k_values, folds=p.soft_folds, seed=seed,
                                       cache_dir=p.cache_dir, log_features=False)
                labels = grid.step("soft_labels", f"seed {seed}", soft, run_soft_labels)
            for backbone in backbones:
                common = dict(backbone=backbone, image_size=p.image_size, epochs=p.epochs, seed=seed)
                for strategy in strategies:
                    init_from = ""
                    if strategy != "imagenet":
                        transition = TransitionParams(manifest=manifest, strategy=strategy, labels=labels or "",
                                                      group_by=p.transition_group_by, **common)
                        init_from = grid.step("transition", f"{backbone} {strategy} seed {seed}", transition, run_transition)
                    target = TargetParams(data_root=p.data_root, split=p.split, init_from=init_from, **common)
                    targets.append(grid.step("target", f"{backbone} {strategy} seed {seed}", target, run_target,
                                             {"data_sha256": data_hash}))
        mlflow.log_metrics({"cells": total, "cells_reused": grid.reused, "target_runs": len(targets)})
        print(f"experiment: {total} cells, {grid.reused} reused; Target runs: {', '.join(t[:8] for t in targets)}")
        return parent.info.run_id
