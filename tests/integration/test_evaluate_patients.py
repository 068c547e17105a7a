"""`evaluate` per patient, end to end: `mlflow run . -e evaluate` with `patient_pattern` on the
real covid-ct-md sample (296 slices of 6 patients), with a tiny Target model, read back through
the client: predictions name file and patient, the patient table, and intervals by patient."""

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mstl.evaluation.metrics import external_metrics
from mstl.evaluation.stats import cluster_bootstrap
from tests.conftest import DATA_ROOT, need_shared, run_entry_point

pytestmark = pytest.mark.integration

EXPERIMENT = "evaluate-patients-it"
CTMD_PATTERN = "ctmd_[a-z]+_([^_]+)_s"  # COVID/ctmd_covid_P001_s026_98C14734-ASSH_69.png: P001
N_BOOTSTRAP = 200


def only_run(client: MlflowClient, stage: str):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.stage = '{stage}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


@pytest.fixture(scope="module")
def evaluated(mlflow_server, data_root, keras_home, tmp_path_factory):
    ctmd = need_shared(DATA_ROOT / "covid-ct-md")
    tiny = {"epochs": 1, "image_size": 32, "n_bootstrap": 20}
    target = run_entry_point("target", {"data_root": data_root, **tiny}, mlflow_server, EXPERIMENT)
    assert target.returncode == 0, target.stderr[-4000:]
    client = MlflowClient(mlflow_server)
    model_run = only_run(client, "target")
    params = {
        "model_uri": f"runs:/{model_run.info.run_id}",
        "images_root": ctmd,
        "positive_class": "COVID",
        "patient_pattern": CTMD_PATTERN,
        "data_name": "covid-ct-md",
        "n_bootstrap": N_BOOTSTRAP,
    }
    result = run_entry_point("evaluate", params, mlflow_server, EXPERIMENT)
    assert result.returncode == 0, result.stderr[-4000:]
    run = only_run(client, "evaluate")
    folder = tmp_path_factory.mktemp("evaluate-artifacts")
    tables = {
        name: pd.read_csv(client.download_artifacts(run.info.run_id, name, str(folder)))
        for name in ("predictions.csv", "patients.csv")
    }
    manifest = pd.read_csv(ctmd / "manifest.csv")
    return client, run, result, tables, manifest


def test_predictions_name_each_file_and_its_patient(evaluated):
    _, run, _, tables, manifest = evaluated
    predictions = tables["predictions.csv"]
    assert len(predictions) == 296 == int(run.data.params["n_images"])
    joined = predictions.merge(manifest, on="file", validate="one_to_one")
    assert len(joined) == 296  # every file named relative to images_root, as the manifest does
    assert (joined["patient_id"] == joined["patient"]).all()
    assert (joined["label"] == (joined["cls"] == "COVID")).all()
    outcome = predictions["outcome"].tolist()
    assert outcome == sorted(outcome, key=["fn", "fp", "tp", "tn"].index)  # the misses first
    threshold = float(run.data.params["used_threshold"])
    assert ((predictions["probability"] >= threshold) == predictions["predicted"]).all()


def test_patient_table_and_figure(evaluated):
    client, run, _, tables, manifest = evaluated
    patients = tables["patients.csv"].set_index("patient_id")
    slices = manifest.groupby("patient").size()
    assert patients["n_slices"].sort_index().equals(slices.sort_index().rename("n_slices"))
    assert patients["label"].to_dict() == {
        p: int(p.startswith("P"))
        for p in ("P001", "P002", "cap001", "cap002", "normal001", "normal002")
    }
    means = tables["predictions.csv"].groupby("patient_id")["probability"].mean()
    assert patients["mean_probability"].sort_index().to_numpy() == pytest.approx(
        means.sort_index().to_numpy()
    )
    assert run.data.metrics["n_patients"] == 6
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/patients.png" in plots


def test_slice_intervals_resample_the_six_patients_and_say_how_few(evaluated):
    _, run, result, tables, _ = evaluated
    assert run.data.params["ci_method"] == run.data.tags["ci_method"] == "patient_cluster_bootstrap"
    assert (run.data.params["n_patients_positive"], run.data.params["n_patients_negative"]) == (
        "2",
        "4",
    )
    note = run.data.tags["ci_warning"]
    assert note.startswith("only 2 positive and 4 negative patient(s)")
    assert f"warning: covid-ct-md: {note}" in result.stdout + result.stderr
    # the logged intervals are the patient-cluster bootstrap's, recomputed from predictions.csv
    # (in the run's own order of the files: the class folders, then the names, sorted)
    slices = tables["predictions.csv"].sort_values("file")
    threshold = float(run.data.params["used_threshold"])
    redone = cluster_bootstrap(
        lambda y, p: external_metrics(y, p, threshold),
        slices["label"].to_numpy(),
        slices["probability"].to_numpy(),
        slices["patient_id"].to_numpy(),
        N_BOOTSTRAP,
        seed=int(run.data.params["seed"]),
    )
    for name in ("specificity", "brier"):  # defined in every resample: 4 negative patients
        assert run.data.metrics[f"{name}_ci_low"] == pytest.approx(redone[name].low, abs=1e-6)
        assert run.data.metrics[f"{name}_ci_high"] == pytest.approx(redone[name].high, abs=1e-6)
