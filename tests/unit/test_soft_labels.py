"""Choosing k: criteria on data with a known answer, bad input, and a search that resumes."""

import mlflow
import numpy as np
import optuna
import pytest
from sklearn.datasets import make_blobs

from mstl.soft_labels import check_features, fold_scores, parse_k_range, parse_k_values
from mstl.soft_labels.clusters import reduce_features
from mstl.stages import soft_labels as stage
from mstl.stages.soft_labels import SoftLabelParams, search_k


@pytest.fixture(scope="module")
def blobs():
    x, _ = make_blobs(n_samples=400, centers=4, n_features=20, cluster_std=1.0, random_state=0)
    return x.astype(np.float32)


def mean_score(x, k, criterion):
    return np.nanmean(fold_scores(x, k, criterion, folds=5, seed=0))


def test_silhouette_finds_the_true_number_of_clusters(blobs):
    scores = {k: mean_score(blobs, k, "silhouette") for k in (2, 4, 8, 16)}
    assert max(scores, key=scores.get) == 4


@pytest.mark.parametrize("criterion", ["calinski_harabasz", "davies_bouldin", "stability"])
def test_other_criteria_also_choose(blobs, criterion):
    scores = {k: mean_score(blobs, k, criterion) for k in (2, 4, 8, 16)}
    assert max(scores, key=scores.get) == 4


def test_the_papers_inertia_criterion_always_prefers_the_largest_k(blobs):
    scores = [mean_score(blobs, k, "inertia") for k in (2, 4, 8, 16)]
    assert scores == sorted(scores)  # negative inertia only rises with k
    assert np.argmax(scores) == 3


@pytest.mark.parametrize(
    "features, folds, k, match",
    [
        (np.zeros((0, 4)), 10, 2, "empty"),
        (np.random.default_rng(0).normal(size=(6, 4)), 10, 2, "fewer than folds=10"),
        (np.random.default_rng(0).normal(size=(20, 4)), 10, 19, "fewer than k=19"),
        (np.ones((50, 4)), 5, 4, "constant"),
    ],
)
def test_bad_inputs_are_named(features, folds, k, match):
    with pytest.raises(ValueError, match=match):
        check_features(features, folds, k)


def test_k_parameters_are_checked():
    assert parse_k_values("16, 2,4,8") == [2, 4, 8, 16]
    assert parse_k_range("2:32") == (2, 32) and parse_k_range("") is None
    for bad in ("1,2", "two", ""):
        with pytest.raises(ValueError, match="k_values"):
            parse_k_values(bad)
    with pytest.raises(ValueError, match="k_range"):
        parse_k_range("8:4")
    with pytest.raises(ValueError, match="criterion"):
        SoftLabelParams(manifest="x", criterion="elbow").validate()


def test_reduction_keeps_rows_and_sets_the_dimension(blobs):
    assert reduce_features(blobs, "pca", 5, 0).shape == (400, 5)
    assert reduce_features(blobs, "random", 8, 0).shape == (400, 8)
    assert reduce_features(blobs, "none", 5, 0) is not None


def test_a_killed_search_resumes_where_it_stopped(blobs, local_tracking, tmp_path, monkeypatch):
    params = SoftLabelParams(manifest="x", k_values="2,4,8", folds=3)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    calls = []
    real = stage.fold_scores

    def dies_on_third(features, k, *args):
        calls.append(k)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is killed mid-search
        return real(features, k, *args)

    monkeypatch.setattr(stage, "fold_scores", dies_on_third)
    with mlflow.start_run() as parent, pytest.raises(KeyboardInterrupt):
        search_k(blobs, params, storage, "resume-test", parent)
    first = list(calls)
    assert len(first) == 3
    calls.clear()
    monkeypatch.setattr(
        stage, "fold_scores", lambda features, k, *a: (calls.append(k), real(features, k, *a))[1]
    )
    with mlflow.start_run() as parent:
        study = search_k(blobs, params, storage, "resume-test", parent)
    assert calls == [first[2]]  # only the k that was interrupted runs again
    complete = [t.params["k"] for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]
    assert sorted(complete) == [2, 4, 8]
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert children["params.k"].tolist() == [str(first[2])]


@pytest.mark.integration  # several processes: run with the integration tests
def test_two_processes_share_one_search_each_k_once(tmp_path):
    """Two workers on one sqlite study at once, as docs/scaling.md runs them: each k is evaluated
    (and logged as a trial run) by exactly one of them, no trial fails, and both end with the same
    best k."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO, child_env

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="two-workers", storage=storage, direction="maximize")
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.workers.soft_search",
                storage,
                f"sqlite:///{tmp_path / f'mlflow{i}.db'}",
                str(tmp_path / f"w{i}.json"),
                "2",
            ],
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(2)]
    assert sorted(results[0]["evaluated"] + results[1]["evaluated"]) == [2, 4, 8, 16]
    assert (
        results[0]["evaluated"] and results[1]["evaluated"]
    )  # both worked: they really shared the search
    assert results[0]["best_k"] == results[1]["best_k"] == 4
    trials = optuna.load_study(study_name="two-workers", storage=storage).get_trials()
    assert not [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    print("evaluated per worker:", [r["evaluated"] for r in results])
