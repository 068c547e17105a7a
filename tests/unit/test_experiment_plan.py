"""The experiment grid's profiles and plan, without running a cell."""

import pytest

from mstl.stages import experiment
from mstl.stages.experiment import IQ_OTH_NCCD_LABELS, ExperimentParams, plan
from mstl.training.fit import set_threads


def test_the_cpu_profile_is_the_papers_settings_with_iq_oth_nccd_as_transition_source(tmp_path):
    p = ExperimentParams(data_root=str(tmp_path)).resolved()
    assert (p.backbones, p.image_size, p.epochs, p.soft_folds) == ("mobilenet_025", 224, 60, 10)
    assert p.transition_slices_root == str(tmp_path / "iq-oth-nccd") and not p.transition_dicom_root
    assert p.transition_label_map == IQ_OTH_NCCD_LABELS and p.transition_group_by == "patient"
    # nodule (benign or malignant) against normal, in the dataset's own folder names
    mapping = dict(item.split("=") for item in IQ_OTH_NCCD_LABELS.split(","))
    assert mapping == {"bengin cases": "1", "malignant cases": "1", "normal cases": "0"}
    # a user's own source wins over the default
    own = ExperimentParams(data_root=str(tmp_path), transition_dicom_root="/dicom").resolved()
    assert own.transition_dicom_root == "/dicom" and not own.transition_slices_root


def test_the_plan_shares_one_cache_folder_and_preprocessing_across_cells(tmp_path):
    (tmp_path / "iq-oth-nccd" / "Normal cases").mkdir(parents=True)
    p = ExperimentParams(
        data_root=str(tmp_path),
        seeds="0,1",
        cache_dir=str(tmp_path / "c"),
        lung_crop=True,
        intensity="clahe",
    ).resolved()
    cells = plan(p, "hash")
    assert (
        len(cells) == 1 + 2 + 2 * 5
    )  # prepare; soft labels per seed; per seed 2 transitions and 3 targets
    made = {
        c.key: c.make({need: "run" for need in c.needs})[0]
        for c in cells
        if c.stage in ("transition", "target")
    }
    assert {m.array_cache_dir for m in made.values()} == {str(tmp_path / "c" / "arrays")}
    assert all(m.lung_crop and m.intensity == "clahe" for m in made.values())
    with pytest.raises(
        ValueError, match="unknown intensity 'gamma'"
    ):  # refused before any cell runs
        ExperimentParams(data_root=str(tmp_path), intensity="gamma").resolved()


def test_workers_with_other_threads_share_one_grid_and_a_negative_count_is_refused(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(experiment, "code_version", lambda: "v")
    p = ExperimentParams(data_root=str(tmp_path))
    name = experiment.grid_study_name(p, "1")
    assert (
        experiment.grid_study_name(ExperimentParams(data_root=str(tmp_path), threads=1), "1")
        == name
    )
    assert (
        experiment.grid_study_name(ExperimentParams(data_root=str(tmp_path), seeds="0,1"), "1")
        != name
    )
    with pytest.raises(ValueError, match="threads must be 0"):
        set_threads(-1)


def test_one_grid_over_two_splits_shares_its_transitions_and_refuses_an_unknown_split(tmp_path):
    (tmp_path / "iq-oth-nccd" / "Normal cases").mkdir(parents=True)
    p = ExperimentParams(data_root=str(tmp_path), seeds="0,1", split="official,patient").resolved()
    cells = plan(p, "hash")
    assert len(cells) == 1 + 2 + 2 * (
        2 + 3 * 2
    )  # per seed: 2 Transitions, 3 Targets on each of 2 splits
    targets = {c.key: c for c in cells if c.stage == "target"}
    made = {
        key: c.make({need: f"run-of-{need}" for need in c.needs})[0] for key, c in targets.items()
    }
    assert made["target/patient/mobilenet_025/soft/s1"].split == "patient"
    assert made["target/official/mobilenet_025/soft/s1"].split == "official"
    # both splits' soft Targets start from the one soft Transition of their seed
    assert {
        made[f"target/{s}/mobilenet_025/soft/s1"].init_from for s in ("official", "patient")
    } == {"run-of-transition/mobilenet_025/soft/s1"}
    order = [c.key for c in cells]
    assert all(order.index(need) < order.index(c.key) for c in cells for need in c.needs)
    for bad in ("official,random", "official,official", ""):
        with pytest.raises(ValueError, match="split must be a comma list"):
            ExperimentParams(data_root=str(tmp_path), split=bad).resolved()


def test_the_cpu_grid_stops_its_transitions_early_and_never_its_targets(tmp_path, monkeypatch):
    (tmp_path / "iq-oth-nccd" / "Normal cases").mkdir(parents=True)
    monkeypatch.setattr(experiment, "code_version", lambda: "v")

    def patience_by_stage(**params):
        p = ExperimentParams(data_root=str(tmp_path), **params).resolved()
        made = [(c.stage, c.make({need: "run" for need in c.needs})[0]) for c in plan(p, "hash")]
        return {
            stage: {m.patience for s, m in made if s == stage} for stage in ("transition", "target")
        }

    assert patience_by_stage() == {"transition": {20}, "target": {0}}
    assert patience_by_stage(transition_patience=0) == {"transition": {0}, "target": {0}}
    assert patience_by_stage(
        profile="paper",
        transition_slices_root=str(tmp_path / "iq-oth-nccd"),
        backbones="mobilenet_025",
    ) == {
        "transition": {0},
        "target": {0},
    }
    name = experiment.grid_study_name(ExperimentParams(data_root=str(tmp_path)), "1")
    assert (
        experiment.grid_study_name(
            ExperimentParams(data_root=str(tmp_path), transition_patience=5), "1"
        )
        != name
    )
    with pytest.raises(ValueError, match="transition_patience must be -1"):
        ExperimentParams(data_root=str(tmp_path), transition_patience=-2).resolved()


def test_the_grid_hands_the_nodule_selection_to_its_prepare_cell(tmp_path):
    """`-e experiment -P transition_dicom_root=... -P transition_nodules_csv=...`: the one prepare
    cell exports with the nodule selection; a selection needing nodules without them is refused."""
    (tmp_path / "dicom").mkdir()
    nodules = tmp_path / "nodules.csv"
    nodules.write_text("series_instance_uid,nodule,x,y,slice,label,diagnosis\n")
    p = ExperimentParams(
        data_root=str(tmp_path),
        transition_dicom_root=str(tmp_path / "dicom"),
        transition_selection="lung+nodule",
        transition_nodules_csv=str(nodules),
    ).resolved()
    cell = experiment.prepare_cell(p)
    prepare, _ = cell.make({})
    assert (prepare.selection, prepare.nodules_csv) == ("lung+nodule", str(nodules))
    no_nodules = ExperimentParams(
        data_root=str(tmp_path),
        transition_dicom_root=str(tmp_path / "dicom"),
        transition_selection="nodule",
    ).resolved()
    with pytest.raises(ValueError, match="needs dicom_root and nodules_csv"):
        experiment.prepare_cell(no_nodules)


def test_a_dry_run_of_the_paper_profile_plans_without_a_transition_source_or_covid_ct(tmp_path):
    paper = dict(profile="paper", weights="none", data_root=str(tmp_path))
    with pytest.raises(ValueError, match="need transition_dicom_root or transition_slices_root"):
        ExperimentParams(**paper).resolved()
    p = ExperimentParams(**paper, dry_run=True).resolved()
    cells = plan(p, "not hashed")  # the prepare cell hashes nothing in a dry run
    assert len(cells) == 1 + 1 + 4 * (2 + 3)  # prepare, soft labels, per backbone 2 + 3
    n, note = experiment.transition_size(p)
    assert n == 10_176 and "the paper's 10,176 SPIE-AAPM slices" in note
    sizes, target_note = experiment.target_sizes(p)
    assert sizes == {"official": (447, 112, 187)} and "Table II" in target_note
    work = {c.key: experiment.cell_work(c, sizes, n) for c in cells}
    assert work["prepare_transition"].n_slices == 10_176
    soft = work["soft_labels/s0"]
    assert (soft.backbone, soft.image_size, soft.n_slices) == ("inceptionv3", 224, 10_176)
    transition = work["transition/densenet169/hard/s0"]
    assert (transition.n_train, transition.n_val, transition.epochs) == (8141, 2035, 60)
    target = work["target/official/resnet101v2/soft/s0"]
    assert (target.n_train, target.n_val, target.n_test, target.image_size) == (447, 112, 187, 224)
    with pytest.raises(RuntimeError, match="never runs it"):
        cells[0].make({})


def test_the_transition_size_counts_the_source_and_covid_ct_its_split(tmp_path):
    folder = tmp_path / "slices" / "normal"
    folder.mkdir(parents=True)
    for name in ("a.png", "b.JPG", "c.jpeg", "notes.txt"):
        (folder / name).write_bytes(b"x")
    p = ExperimentParams(data_root="/work/shared/data", transition_slices_root=str(folder.parent))
    n, note = experiment.transition_size(p)
    assert n == 3 and "3 image files under" in note
    dicom = ExperimentParams(transition_dicom_root=str(folder.parent))
    assert experiment.transition_size(dicom)[0] == 4  # every file may be a DICOM slice


def test_dry_run_and_workers_change_the_plan_run_not_the_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "code_version", lambda: "v")
    base = ExperimentParams(data_root=str(tmp_path))
    name = experiment.grid_study_name(base, "1")
    other = ExperimentParams(data_root=str(tmp_path), dry_run=True, workers=3)
    assert experiment.grid_study_name(other, "1") == name
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        ExperimentParams(data_root=str(tmp_path), workers=0).resolved()


@pytest.mark.integration  # starts the probe's process (TensorFlow): about a minute here
def test_a_dry_run_prints_the_plan_records_it_and_runs_no_cell(local_tracking, tmp_path, capsys):
    import mlflow

    run_id = experiment.run_experiment(
        ExperimentParams(
            profile="paper",
            backbones="mobilenet_025",
            soft_feature_backbone="mobilenet_025",
            image_size=32,
            epochs=2,
            weights="none",
            data_root=str(tmp_path / "no-data"),
            cache_dir=str(tmp_path / "cache"),
            dry_run=True,
        )
    )
    out = capsys.readouterr().out
    assert "plan of the paper grid" in out and "h for one worker" in out
    assert "dry run: no cell was run" in out
    client = mlflow.MlflowClient(local_tracking)
    runs = client.search_runs([client.get_run(run_id).info.experiment_id])
    assert [r.data.tags["stage"] for r in runs] == ["experiment_plan"]  # no cell's run, no grid's
    logged = client.get_run(run_id).data
    assert logged.metrics["estimated_hours"] > 0 and logged.metrics["estimated_peak_rss_gb"] > 0
    assert {a.path for a in client.list_artifacts(run_id, "plan")} == {
        "plan/cost.csv",
        "plan/plan.txt",
        "plan/throughput.csv",
    }
    assert not (tmp_path / "cache").exists()  # no study, no cache


def test_every_target_cell_is_evaluated_on_each_external_set_nested_under_it(tmp_path):
    """An evaluate cell per Target cell and external set, after its Target and nested under its run
    (not the grid's), with the set's positive class and patient pattern."""
    ext = tmp_path / "hospital-b"
    for folder in ("COVID", "normal"):
        (ext / folder).mkdir(parents=True)
    csv = tmp_path / "hospital-c.csv"
    csv.write_text("path,label,patient_id\na.png,1,p1\n")
    p = ExperimentParams(
        profile="cpu",
        strategies="imagenet",
        seeds="0,1",
        data_root=str(tmp_path),
        external_sets=f"{ext},{csv}",
        external_patient_pattern="^(p[0-9]+)_",
    ).resolved()
    cells = {c.key: c for c in plan(p, "hash")}
    evaluations = [c for c in cells.values() if c.stage == "evaluate"]
    targets = [c for c in cells.values() if c.stage == "target"]
    assert len(evaluations) == 2 * len(targets) == 4
    for cell in evaluations:
        assert cell.needs == (cell.parent,) and cells[cell.parent].stage == "target"
        params, _ = cell.make({cell.parent: "TARGETRUN"})
        assert params.model_uri == "runs:/TARGETRUN" and params.seed == int(cell.key[-1])
    folder_cell = cells["evaluate/hospital-b/official/mobilenet_025/imagenet/s1"]
    folder, _ = folder_cell.make({folder_cell.parent: "r"})
    assert (folder.images_root, folder.positive_class) == (str(ext), "COVID")
    assert folder.patient_pattern == "^(p[0-9]+)_"
    csv_cell = cells["evaluate/hospital-c/official/mobilenet_025/imagenet/s0"]
    from_csv, _ = csv_cell.make({csv_cell.parent: "r"})
    assert from_csv.labels_csv == str(csv)
    assert (from_csv.images_root, from_csv.patient_pattern) == ("", "")


def test_a_missing_external_set_is_named_before_any_cell(tmp_path):
    with pytest.raises(FileNotFoundError, match="external set .*nowhere not found"):
        ExperimentParams(
            profile="cpu", strategies="imagenet", external_sets=str(tmp_path / "nowhere")
        ).resolved()


def test_a_dry_run_plans_an_evaluate_cell_for_an_external_set_not_there_yet(tmp_path):
    paper = dict(profile="paper", weights="none", data_root=str(tmp_path), strategies="imagenet")
    p = ExperimentParams(**paper, dry_run=True, external_sets=str(tmp_path / "later")).resolved()
    cells = plan(p, "not hashed")
    evaluates = [c for c in cells if c.stage == "evaluate"]
    assert len(evaluates) == 4  # one per paper backbone's Target cell
    assert {c.key.split("/")[1] for c in evaluates} == {"later"}
