"""compare's pairing of MSTL runs with their ImageNet baseline, on the test split and on external
sets."""

import numpy as np
import pandas as pd
import pytest

from mstl.evaluation.external_report import external_table
from mstl.evaluation.grid_stats import comparisons
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
        "## The answer" in text and "What these test sets can detect" in text and "p (Holm)" in text
    )
    assert "hard-0, imagene" in text  # the runs behind each paired row, by ID


def grid_with_patients(seeds=3, seed=7):
    """A grid of ImageNet and hard runs, each evaluated on one external set of 6 patients x 5
    slices (P1-P3 positive)."""
    runs = grid(seeds, seed)
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"P{i}" for i in range(1, 7)], 5)
    y = (np.char.lstrip(patients.astype(str), "P").astype(int) <= 3).astype(int)
    rows = []
    for _, run in runs.iterrows():
        predictions = pd.DataFrame(
            {
                "file": [f"{p}/{i}.png" for i, p in enumerate(patients)],
                "patient_id": patients,
                "sha256": [f"h{i}" for i in range(len(y))],
                "label": y,
                "probability": np.clip(rng.random(len(y)) * 0.7 + 0.2 * y, 0, 1),
            }
        )
        rows.append(
            {
                "run_id": run["run_id"],
                "data": "hospital-x",
                "digest": "abc",
                "evaluate_run_id": f"e-{run['run_id']}",
                "metrics": {
                    "roc_auc": 0.6,
                    "sensitivity": 0.3,
                    "specificity": 0.8,
                    "lung_attention": 0.2 + 0.1 * run["seed"],
                },
                "predictions": predictions,
            }
        )
    return runs, pd.DataFrame(rows)


def test_the_external_table_reports_each_run_at_its_validation_threshold_and_per_patient():
    from mstl.evaluation.external_report import (
        patients_over_seeds,
        per_patient,
        scored_runs,
    )
    from mstl.evaluation.stats import threshold_for_recall

    runs, external = grid_with_patients()
    table = external_table(runs, external, 0.9).set_index("strategy")
    expected = {"t": [], "sens": [], "spec": [], "right": []}
    for _, run in runs[runs["strategy"] == "hard"].iterrows():
        t = threshold_for_recall(run["val"]["label"], run["val"]["probability"], 0.9)
        ev = external.set_index("run_id").loc[run["run_id"], "predictions"]
        called = ev["probability"] >= t
        expected["t"].append(t)
        expected["sens"].append(called[ev["label"] == 1].mean())
        expected["spec"].append((~called[ev["label"] == 0]).mean())
        score = ev.groupby("patient_id")["probability"].mean()
        truth = ev.groupby("patient_id")["label"].max()
        expected["right"].append(int(((score >= t).astype(int) == truth).sum()))
    hard = table.loc["hard"]
    assert hard["val_threshold"] == pytest.approx(np.mean(expected["t"]))
    assert hard["sensitivity_at_val_threshold"] == pytest.approx(np.mean(expected["sens"]))
    assert hard["specificity_at_val_threshold"] == pytest.approx(np.mean(expected["spec"]))
    assert hard["patients_right"] == pytest.approx(np.mean(expected["right"]))
    assert hard["patients"] == 6 and hard["seeds"] == 3
    assert hard["lung_attention"] == pytest.approx(0.3)  # mean of seeds 0-2's 0.2, 0.3, 0.4
    assert np.isnan(hard["masked_lung_auc"])  # not measured: NaN, not a made-up value

    patients = per_patient(scored_runs(runs, external), 0.9)
    assert len(patients) == 6 * 3 * 2  # patients x seeds x strategies
    summary = patients_over_seeds(patients)
    p1 = summary[(summary["strategy"] == "hard") & (summary["patient_id"] == "P1")].iloc[0]
    mine = patients[(patients["strategy"] == "hard") & (patients["patient_id"] == "P1")]
    assert p1["called_at_val_threshold"] == int(mine["called_at_val_threshold"].sum())
    assert p1["mean_probability"] == pytest.approx(mine["mean_probability"].mean())
    assert p1["label"] == 1 and p1["n_slices"] == 5 and p1["seeds"] == 3


def test_the_report_gives_the_external_answer_over_seeds_its_power_and_the_patients(tmp_path):
    from mstl.evaluation.grid_stats import detectable_differences
    from mstl.evaluation.report import write_report

    runs, external = grid_with_patients()
    paired = comparisons(runs, external)
    power = detectable_differences(runs, paired, external).set_index("data")
    assert set(power.index) == {"test", "hospital-x"}
    assert power.loc["hospital-x", "baseline_auc"] == pytest.approx(0.6)  # from the evaluate runs
    assert power.loc["hospital-x", "n_test"] == 30 and power.loc["test", "n_test"] == 60
    counts = write_report(runs, external, 0.9, tmp_path, "Generated by test.")
    text = (tmp_path / "report.md").read_text()
    assert "## The answer: MSTL minus ImageNet, over seeds (the external set hospital-x)" in text
    assert (
        "## External sets per patient" in text and "![patients of external_patients_1.png]" in text
    )
    assert "patient-cluster bootstrap" in text  # how the external pairs were tested, said
    external_rows = paired[paired["data"] == "hospital-x"]
    assert set(external_rows["test"]) == {"patient-cluster bootstrap"}
    assert set(paired.loc[paired["data"] == "test", "test"]) == {"DeLong", "McNemar (exact)"}
    assert (tmp_path / "external_patients_1.png").stat().st_size > 1000
    assert (tmp_path / "forest_external_1.png").stat().st_size > 1000
    assert "on the external set hospital-x](forest_external_1.png)" in text
    per_seed = pd.read_csv(tmp_path / "external_patients.csv")
    assert len(per_seed) == 36 and counts["n_external_sets"] == 1


def test_a_second_results_section_keeps_the_first_and_its_own_figures(tmp_path):
    from mstl.evaluation.report import RESULTS_START, section_markers, write_results_doc

    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# Grid B\n\n![p](external_patients_1.png)\n")
    (report / "external_patients_1.png").write_bytes(b"b")
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\n{RESULTS_START}\ngrid A\n<!-- mstl:results:end -->\n")
    write_results_doc(report, doc, "cpu-external")
    text = doc.read_text()
    start, end = section_markers("cpu-external")
    assert "grid A" in text and text.index(RESULTS_START) < text.index(start) < text.index(end)
    assert "](results/cpu-external/external_patients_1.png)" in text
    assert (tmp_path / "results" / "cpu-external" / "external_patients_1.png").read_bytes() == b"b"
    with pytest.raises(ValueError, match="'Bad Name'"):
        section_markers("Bad Name")
