"""The plan's arithmetic: images and seconds per stage from given throughputs, and its totals."""

import json
import math
from dataclasses import asdict

import pytest

from mstl import defaults
from mstl.training.cost import (
    BackboneCost,
    CellWork,
    Measurements,
    images_per_second,
    measurements_from_json,
    plan_cost,
)

GB = 1e9


def throughputs(frozen_values: int = 100) -> BackboneCost:
    """Round numbers: 100 images/s frozen, 50 a cached step, 200 a cached forward, 10 a full step,
    20 a prediction, 40 the conv base; 1 GB RSS after its probe."""
    return BackboneCost(
        "mobilenet_025",
        32,
        8,
        build_seconds=2.0,
        base_forward=40.0,
        predict=20.0,
        full_step=10.0,
        frozen_forward=100.0,
        top_step=50.0,
        top_forward=200.0,
        frozen_values=frozen_values,
        feature_values=1000,
        rss_bytes=int(1 * GB),
    )


def measured(backbone: BackboneCost) -> Measurements:
    return Measurements(
        {"mobilenet_025@32": backbone},
        startup_seconds=5.0,
        base_rss_bytes=int(0.5 * GB),
        kmeans_seconds_per_slice=0.01,
    )


def grid() -> list[CellWork]:
    """One prepare (1,000 slices), one soft-label cell, one Transition (800 + 200 slices, 10
    epochs) and two Targets (400/100/200 images, 10 epochs)."""
    fit = dict(backbone="mobilenet_025", image_size=32, epochs=10)
    return [
        CellWork("prepare_transition", n_slices=1000),
        CellWork("soft_labels", "mobilenet_025", 32, n_slices=1000),
        CellWork("transition", n_train=800, n_val=200, **fit),
        CellWork("target", n_train=400, n_val=100, n_test=200, **fit),
        CellWork("target", n_train=400, n_val=100, n_test=200, **fit),
    ]


def test_each_stage_counts_its_images_and_seconds_from_the_measured_throughputs():
    cost = plan_cost(grid(), measured(throughputs()))
    rows = cost.table.set_index("stage")
    stages = ["prepare_transition", "soft_labels", "transition", "target"]
    assert list(rows.index) == [*stages, "total"]
    assert rows.loc["prepare_transition", "images"] == 1000
    assert rows.loc["prepare_transition", "seconds"] == pytest.approx(5 + 1000 / 114)
    # features through the conv base, then the KMeans search per slice, a process and a network
    assert rows.loc["soft_labels", "seconds"] == pytest.approx(5 + 2 + 1000 / 40 + 1000 * 0.01)
    # frozen pass once over train + val, then 10 epochs of cached steps and validation
    assert rows.loc["transition", "images"] == 1000 + 10 * 1000
    assert rows.loc["transition", "seconds"] == pytest.approx(
        5 + 2 + 1000 / 100 + 10 * (800 / 50 + 200 / 200)
    )
    # a Target adds val + test predictions, the masked-lung test pass and Grad-CAM on test
    target = 5 + 2 + 500 / 100 + 10 * (400 / 50 + 100 / 200) + (100 + 400) / 20 + 200 / 10
    assert rows.loc["target", "cells"] == 2
    assert rows.loc["target", "images"] == 2 * (500 + 10 * 500 + 100 + 3 * 200)
    assert rows.loc["target", "seconds"] == pytest.approx(2 * target)
    assert rows.loc["target", "seconds_per_cell"] == pytest.approx(target)
    total = rows.loc[["prepare_transition", "soft_labels", "transition", "target"], "seconds"]
    assert rows.loc["total", "seconds"] == pytest.approx(total.sum())
    assert rows.loc["total", "cells"] == 5
    assert cost.hours == pytest.approx(total.sum() / 3600)
    assert cost.hours_workers == cost.hours  # one worker


def test_workers_split_the_cells_evenly_when_there_are_enough():
    work = grid() + [grid()[-1]] * 8  # ten Targets
    one, two = plan_cost(work, measured(throughputs())), plan_cost(work, measured(throughputs()), 2)
    assert two.hours_workers == pytest.approx(one.hours / 2) and two.hours == one.hours


def test_many_workers_never_beat_the_chain_of_stages_each_cell_waits_for():
    cost = plan_cost(grid(), measured(throughputs()), workers=100)
    per_cell = cost.table.set_index("stage")["seconds_per_cell"].drop("total")
    assert cost.hours_workers == pytest.approx(per_cell.sum() / 3600)
    assert cost.hours_workers > cost.hours / 100
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        plan_cost(grid(), measured(throughputs()), workers=0)


def test_peak_memory_counts_the_network_the_slices_the_features_and_the_worker():
    cost = plan_cost(grid(), measured(throughputs()))
    rows = cost.table.set_index("stage")
    # worker 0.5 GB + the probe's 1 GB + uint8 slices + the cut's float32 features, once (in memory
    # under the budget; past it they are memory-mapped: page cache)
    target = 0.5 * GB + 1 * GB + 700 * 32 * 32 + 4 * 100 * 500
    assert rows.loc["target", "peak_rss_gb"] == pytest.approx(target / GB)
    soft = 0.5 * GB + 1 * GB + 2 * 4 * 1000 * 1000
    assert rows.loc["soft_labels", "peak_rss_gb"] == pytest.approx(soft / GB)
    assert cost.peak_rss_gb == pytest.approx(rows["peak_rss_gb"].max())
    assert cost.metrics()["estimated_peak_rss_gb"] == cost.peak_rss_gb


def test_features_past_the_memory_budget_stay_cached_but_leave_the_process_memory():
    """Past ``FROZEN_CACHE_MAX_BYTES`` the features are memory-mapped (the fit still trains the top
    on them): the same seconds as a cached fit, and no feature bytes in the worker's peak."""
    small, too_big = 100, defaults.FROZEN_CACHE_MAX_BYTES // (4 * 500) + 1
    work = [CellWork("target", "mobilenet_025", 32, 10, 400, 100, 200)]
    rows = {
        n: plan_cost(work, measured(throughputs(n))).table.set_index("stage").loc["target"]
        for n in (small, too_big)
    }
    assert rows[too_big]["images"] == rows[small]["images"]  # the frozen pass, then cached epochs
    assert rows[too_big]["seconds"] == pytest.approx(rows[small]["seconds"])
    in_memory = 4 * small * 500 / GB
    assert rows[small]["peak_rss_gb"] - rows[too_big]["peak_rss_gb"] == pytest.approx(in_memory)


def test_an_unmeasured_network_or_stage_is_named_in_the_error():
    with pytest.raises(KeyError, match="no measurement of densenet121@32"):
        plan_cost([CellWork("target", "densenet121", 32, 1, 1, 1, 1)], measured(throughputs()))
    with pytest.raises(ValueError, match="unknown stage 'explain'"):
        plan_cost([CellWork("explain", "mobilenet_025", 32)], measured(throughputs()))


def test_the_plan_prints_its_totals_and_notes_and_round_trips_as_json():
    cost = plan_cost(grid(), measured(throughputs()), notes=["Transition: 1,000 slices"])
    text = cost.text()
    assert "total" in text and "- Transition: 1,000 slices" in text
    assert f"{cost.hours:.2f} h for one worker" in text
    m = measured(throughputs())
    assert measurements_from_json(json.dumps(asdict(m))) == m


def test_images_per_second_times_the_calls_after_one_warm_up():
    calls = []
    rate = images_per_second(lambda: calls.append(1), batch_size=8, batches=3)
    assert len(calls) == 4 and rate > 0 and math.isfinite(rate)
