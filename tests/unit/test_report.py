"""compare's pairing of MSTL runs with their ImageNet baseline, on the test split and on external
sets."""

import numpy as np
import pandas as pd
import pytest

from mstl.evaluation.grid_stats import comparisons
from mstl.evaluation.report import external_table
from mstl.evaluation.stats import delong_test


def fake_run(run_id, strategy, rng, n=40):
    y = np.arange(n) % 2
    test = pd.DataFrame(
        {
            "file": [f"f{i}.png" for i in range(n)],
            "label": y,
            "probability": rng.random(n) * 0.5 + 0.4 * y,
        }
    )
    return {
        "run_id": run_id,
        "backbone": "mobilenet_025",
        "strategy": strategy,
        "split": "official",
        "seed": 0,
        "image_size": 64,
        "epochs": 1,
        "threshold": 0.5,
        "model_id": f"m-{run_id}",
        "metrics": {},
        "val": test,
        "test": test,
    }


def external_row(run_id, rng, order):
    y = np.arange(30) % 2
    predictions = pd.DataFrame(
        {
            "sha256": [f"h{i}" for i in range(30)],
            "label": y,
            "probability": rng.random(30) * 0.6 + 0.3 * y,
        }
    )
    auc = float(
        np.mean(
            [
                a > b
                for a in predictions.probability[y == 1]
                for b in predictions.probability[y == 0]
            ]
        )
    )
    return {
        "run_id": run_id,
        "data": "hospital-x",
        "digest": "abc",
        "evaluate_run_id": f"e-{run_id}",
        "metrics": {"roc_auc": auc, "roc_auc_ci_low": auc - 0.1, "roc_auc_ci_high": auc + 0.1},
        "predictions": predictions.iloc[order].reset_index(drop=True),
    }


def test_external_pairs_join_by_content_hash_and_match_delong_on_the_aligned_scores():
    rng = np.random.default_rng(0)
    runs = pd.DataFrame([fake_run("base", "imagenet", rng), fake_run("mstl", "hard", rng)])
    ext = [
        external_row("base", rng, np.arange(30)),
        external_row("mstl", rng, rng.permutation(30)),
    ]  # another file order
    external = pd.DataFrame(ext)
    paired = comparisons(runs, external)
    assert sorted(paired["data"].unique()) == ["hospital-x", "test"]
    row = paired[(paired["data"] == "hospital-x") & (paired["metric"] == "auc")].iloc[0]
    ours = (
        ext[1]["predictions"]
        .set_index("sha256")
        .loc[ext[0]["predictions"]["sha256"], "probability"]
    )
    expected = delong_test(
        ext[0]["predictions"]["label"], ours.to_numpy(), ext[0]["predictions"]["probability"]
    )
    assert row["difference"] == pytest.approx(expected.difference) and row[
        "p_value"
    ] == pytest.approx(expected.p_value)
    assert row["run_id"] == "mstl" and row["baseline_run_id"] == "base"
    table = external_table(runs, external).set_index("strategy")
    assert (
        table.loc["hard", "roc_auc"] == pytest.approx(ext[1]["metrics"]["roc_auc"])
        and table.loc["hard", "n_images"] == 30
    )
    assert table.loc["hard", "roc_auc_ci"].startswith("[")


def test_an_external_set_scored_on_different_images_is_refused_by_name():
    rng = np.random.default_rng(1)
    runs = pd.DataFrame([fake_run("base", "imagenet", rng), fake_run("mstl", "hard", rng)])
    ext = [external_row("base", rng, np.arange(30)), external_row("mstl", rng, np.arange(25))]
    with pytest.raises(ValueError, match="different images of hospital-x"):
        comparisons(runs, pd.DataFrame(ext))


def test_without_external_runs_only_the_test_split_is_paired():
    rng = np.random.default_rng(2)
    runs = pd.DataFrame([fake_run("base", "imagenet", rng), fake_run("mstl", "soft", rng)])
    paired = comparisons(runs, None)
    assert set(paired["data"]) == {"test"} and len(paired) == 3
    assert external_table(runs, pd.DataFrame()).empty


def grid(seeds=3, seed=5):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(seeds):
        for strategy in ("imagenet", "hard"):
            run = fake_run(f"{strategy}-{s}", strategy, rng, n=60)
            run["seed"] = s
            run["metrics"] = {"test_roc_auc": 0.8, "test_recall": 0.7}
            rows.append(run)
    return pd.DataFrame(rows)


def test_holm_over_the_family_the_mean_over_seeds_and_the_detectable_differences():
    from scipy import stats as st

    from mstl.evaluation.grid_stats import detectable_differences, over_seeds
    from mstl.evaluation.stats import detectable_auc_difference, holm

    runs = grid()
    paired = comparisons(runs)
    assert len(paired) == 9  # 3 seeds x (auc, accuracy, sensitivity)
    np.testing.assert_allclose(paired["p_holm"], holm(paired["p_value"]))
    summary = over_seeds(paired)
    auc = summary[summary["metric"] == "auc"].iloc[0]
    d = paired.loc[paired["metric"] == "auc", "difference"].to_numpy()
    half = st.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert auc["mean_difference"] == pytest.approx(d.mean()) and auc["ci_high"] == pytest.approx(
        d.mean() + half
    )
    assert auc["seeds"] == 3 and auc["seeds_favouring_mstl"] == int((d > 0).sum())
    assert auc["run_ids"] == "hard-0,hard-1,hard-2"
    power = detectable_differences(runs, paired).iloc[0]
    se = paired.loc[paired["metric"] == "auc", "se"].median()
    assert power["detectable_auc"] == pytest.approx(detectable_auc_difference(se))
    assert power["detectable_auc_holm"] == pytest.approx(detectable_auc_difference(se, 0.05 / 9))
    assert power["n_positive"] == 30 and power["baseline_auc"] == pytest.approx(0.8)


def test_the_results_section_of_a_doc_is_regenerated_between_its_markers(tmp_path):
    from mstl.evaluation.report import RESULTS_END, RESULTS_START, write_results_doc

    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# MSTL\n\n![forest](forest_test.png)\n")
    (report / "forest_test.png").write_bytes(b"png")
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text(
        f"# Results\n\nTyped intro.\n\n{RESULTS_START}\nold numbers\n{RESULTS_END}\n\nTyped "
        "outro.\n"
    )
    write_results_doc(report, doc)
    text = doc.read_text()
    assert "old numbers" not in text and "Typed intro." in text and "Typed outro." in text
    assert (
        "## MSTL" in text and "](results/forest_test.png)" in text
    )  # one level down, figures beside the doc
    assert (tmp_path / "docs" / "results" / "forest_test.png").read_bytes() == b"png"
    write_results_doc(report, doc)
    assert doc.read_text() == text  # regenerating is idempotent


def test_the_forest_plot_and_the_report_name_every_seed_and_run():
    from mstl.evaluation.grid_stats import detectable_differences, forest_figure, over_seeds
    from mstl.evaluation.report import markdown_report, table_iii

    runs = grid()
    paired = comparisons(runs)
    summary, detectable = over_seeds(paired), detectable_differences(runs, paired)
    fig = forest_figure(paired, summary)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert [x for x in labels if x] == [
        "official hard s0",
        "official hard s1",
        "official hard s2",
        "official hard: mean of 3",
    ]
    best = runs.head(1).assign(val_recall=0.9)
    text = markdown_report(
        table_iii(runs, 0.95), paired, best, 0.95, None, summary, detectable, "Generated by test."
    )
    assert (
        "## The answer" in text and "What this test set can detect" in text and "p (Holm)" in text
    )
    assert "hard-0, imagene" in text  # the runs behind each paired row, by ID
