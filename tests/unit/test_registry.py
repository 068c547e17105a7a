"""Choosing the champion: highest validation recall, ties by validation AUC, never an unfinished
run."""

import mlflow
import pytest

from mstl.stages.promote import PromoteParams, candidates


def make_run(
    client, experiment_id, recall, auc, status="FINISHED", log_model="true", test_recall=0.5
):
    run = client.create_run(experiment_id, tags={"stage": "target"})
    for key, value in {
        "val_recall": recall,
        "val_roc_auc": auc,
        "test_recall": test_recall,
    }.items():
        client.log_metric(run.info.run_id, key, value)
    client.log_param(run.info.run_id, "log_model", log_model)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_candidates_rank_by_validation_recall_then_auc(local_tracking):
    client = mlflow.MlflowClient(local_tracking)
    exp = client.create_experiment("promo")
    low = make_run(client, exp, 0.70, 0.95)
    tie_low_auc = make_run(client, exp, 0.90, 0.80)
    best = make_run(client, exp, 0.90, 0.85, test_recall=0.1)
    make_run(client, exp, 0.99, 0.99, status="FAILED")
    make_run(client, exp, 0.99, 0.99, log_model="false")
    make_run(client, exp, 0.50, 0.50, test_recall=0.99)
    ranked = [r.info.run_id for r in candidates(client, "promo", "val")]
    assert ranked[:3] == [best, tie_low_auc, low]
    assert len(ranked) == 4  # the failed run and the one without a model are not candidates


def test_no_candidate_and_bad_parameters_are_named(local_tracking):
    client = mlflow.MlflowClient(local_tracking)
    client.create_experiment("empty")
    with pytest.raises(ValueError, match="no finished Target run"):
        candidates(client, "empty", "val")
    with pytest.raises(ValueError, match="no experiment named 'nowhere'"):
        candidates(client, "nowhere", "val")
    with pytest.raises(ValueError, match="select_on"):
        PromoteParams(select_on="train").validate()


def test_a_data_set_another_worker_inserted_first_is_told_apart_from_other_errors():
    from mlflow.exceptions import MlflowException

    from mstl.tracking import is_duplicate_dataset

    # the message a tracking server returned when two grid workers logged one new data set at once
    raced = MlflowException(
        "BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
        "datasets.name, datasets.digest"
    )
    assert is_duplicate_dataset(raced)
    assert not is_duplicate_dataset(MlflowException("RESOURCE_DOES_NOT_EXIST: Run 'abc' not found"))
    assert not is_duplicate_dataset(MlflowException("UNIQUE constraint failed: runs.run_uuid"))
