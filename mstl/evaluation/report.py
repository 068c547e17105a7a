"""The compare report's parts: the paper's Table III and Figures 5-7 from the Target runs on a
tracking server,
with confidence intervals, paired tests against the ImageNet baseline, and an operating point chosen
on
validation data. Written as Markdown + PNG + CSV and logged as the compare run's artifacts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from mstl.evaluation.grid_stats import SETTING
from mstl.evaluation.metrics import METRIC_NAMES, point_metrics
from mstl.evaluation.stats import threshold_for_recall

EXTERNAL_METRICS = ("roc_auc", "sensitivity", "specificity")


def external_table(runs: pd.DataFrame, external: pd.DataFrame) -> pd.DataFrame:
    """Per external data set and setting: AUC, sensitivity and specificity as value [CI] (one seed)
    or mean ± SD."""
    if external.empty:
        return pd.DataFrame()
    joined = external.merge(runs.drop(columns=["metrics"]), on="run_id")
    out = []
    for (data, digest, *setting), group in joined.groupby(["data", "digest", *SETTING]):
        row = {
            "data": data,
            "digest": digest,
            **dict(zip(SETTING, setting, strict=True)),
            "seeds": len(group),
        }
        row["n_images"] = int(np.median([len(p) for p in group["predictions"]]))
        for name in EXTERNAL_METRICS:
            values = [m[name] for m in group["metrics"] if name in m]
            row[name] = float(np.mean(values)) if values else float("nan")
            if len(group) == 1 and values:
                m = group["metrics"].iloc[0]
                row[f"{name}_ci"] = (
                    f"[{m.get(f'{name}_ci_low', np.nan):.3f}, "
                    f"{m.get(f'{name}_ci_high', np.nan):.3f}]"
                )
            else:
                row[f"{name}_ci"] = (
                    f"± {np.std(values, ddof=1):.3f} (SD over seeds)" if len(values) > 1 else ""
                )
        row["evaluate_run_ids"] = ",".join(group["evaluate_run_id"])
        out.append(row)
    return pd.DataFrame(out)


def table_iii(runs: pd.DataFrame, target_recall: float) -> pd.DataFrame:
    """Per backbone x strategy x split: each metric as value [CI] (one seed) or mean ± SD
    (several)."""
    out = []
    for (backbone, strategy, split, size, epochs), group in runs.groupby(SETTING):
        row = {
            "backbone": backbone,
            "strategy": strategy,
            "split": split,
            "image_size": size,
            "epochs": epochs,
            "seeds": len(group),
        }
        for name in METRIC_NAMES:
            values = [m[f"test_{name}"] for m in group["metrics"] if f"test_{name}" in m]
            row[name] = float(np.mean(values)) if values else float("nan")
            if len(group) == 1:
                m = group["metrics"].iloc[0]
                row[f"{name}_ci"] = (
                    f"[{m.get(f'test_{name}_ci_low', np.nan):.3f}, "
                    f"{m.get(f'test_{name}_ci_high', np.nan):.3f}]"
                )
            else:
                row[f"{name}_ci"] = (
                    f"± {np.std(values, ddof=1):.3f} (SD over seeds)" if len(values) > 1 else ""
                )
        operating = []
        for _, run in group.iterrows():
            t = threshold_for_recall(run["val"]["label"], run["val"]["probability"], target_recall)
            at = point_metrics(run["test"]["label"], run["test"]["probability"], t)
            operating.append((t, at["recall"], at["specificity"]))
        (
            row["val_threshold"],
            row["test_recall_at_threshold"],
            row["test_specificity_at_threshold"],
        ) = np.mean(operating, axis=0)
        row["run_ids"] = ",".join(group.sort_values("seed")["run_id"])
        out.append(row)
    return pd.DataFrame(out)


def roc_panel(runs: pd.DataFrame, key: str, title: str):
    first = runs.sort_values("seed").groupby(SETTING).head(1)
    groups = list(first.groupby(key))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4), dpi=110, squeeze=False)
    for ax, (name, group) in zip(axes[0], groups, strict=False):
        for _, run in group.iterrows():
            y, p = run["test"]["label"], run["test"]["probability"]
            fpr, tpr, _ = roc_curve(y, p)
            other = run["strategy"] if key == "backbone" else run["backbone"]
            ax.plot(
                fpr,
                tpr,
                label=f"{other} ({run['split']}, {run['image_size']} px) "
                f"AUC {roc_auc_score(y, p):.3f}",
            )
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        ax.set(title=f"{name}", xlabel="1 - specificity", ylabel="sensitivity")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def table_head(names: list[str]) -> list[str]:
    """A Markdown table's header and separator lines, the separator derived from the header."""
    return [table_row(names), "|" + " --- |" * len(names)]


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def external_section(external: pd.DataFrame) -> list[str]:
    """Table III's external columns: each setting on each external set it was evaluated on."""
    if external.empty:
        return []
    lines = [
        "",
        "## External validation (`evaluate` runs of these models)",
        "",
        *table_head(
            [
                "data (digest)",
                "images",
                "backbone",
                "strategy",
                "split",
                "image size",
                "epochs",
                "seeds",
            ]
            + ["AUC", "sensitivity", "specificity"]
        ),
    ]
    for _, r in external.iterrows():
        cells = [
            f"{r['data']} ({r['digest']})",
            str(r["n_images"]),
            r["backbone"],
            r["strategy"],
            r["split"],
        ]
        cells += [str(r["image_size"]), str(r["epochs"]), str(r["seeds"])]
        cells += [f"{r[m]:.3f} {r[f'{m}_ci']}".strip() for m in EXTERNAL_METRICS]
        lines.append(table_row(cells))
    return lines


def short(run_ids) -> str:
    return ", ".join(str(r)[:8] for r in run_ids)


def answer_section(summary: pd.DataFrame, detectable: pd.DataFrame) -> list[str]:
    """The grid's answer per split and strategy: the mean paired difference over seeds, and what it
    means
    given what the test set can detect."""
    test = summary[summary["data"] == "test"]
    if test.empty:
        return []
    lines = [
        "",
        "## The answer: MSTL minus ImageNet, over seeds (COVID-CT test split)",
        "",
        *table_head(
            [
                "backbone",
                "split",
                "strategy",
                "metric",
                "mean difference [95 % t CI]",
                "seeds",
                "seeds favouring MSTL",
            ]
            + ["seeds significant (Holm)", "p over seeds"]
        ),
    ]
    for _, r in test.iterrows():
        lines.append(
            f"| {r['backbone']} | {r['split']} | {r['strategy']} | {r['metric']} | "
            f"{r['mean_difference']:+.3f} "
            f"{interval_text(r['ci_low'], r['ci_high'])} | {r['seeds']} | "
            f"{r['seeds_favouring_mstl']} | "
            f"{r['seeds_significant_holm']} | {r['p_over_seeds']:.3g} |"
        )
    lines.append("")
    for _, r in test[test["metric"].isin(["auc", "sensitivity"])].iterrows():
        d = detectable[
            (detectable["split"] == r["split"]) & (detectable["backbone"] == r["backbone"])
        ]
        floor = d.iloc[0][f"detectable_{r['metric']}"] if len(d) else float("nan")
        if not np.isfinite(r["ci_low"]):
            verdict = "one seed only: no interval over seeds (see its paired test below)"
        elif r["ci_low"] > 0:
            verdict = "MSTL is better: the interval over seeds lies above zero"
        elif r["ci_high"] < 0:
            verdict = "the ImageNet baseline is better: the interval over seeds lies below zero"
        else:
            verdict = "no difference shown: the interval over seeds contains zero"
        lines.append(
            f"- {r['split']} split, {r['strategy']}, {r['metric']}: {r['mean_difference']:+.3f} "
            f"{interval_text(r['ci_low'], r['ci_high'])}; {verdict}"
            + (
                f" (one seed's test detects {floor:.3f} with 80 % power)."
                if np.isfinite(floor)
                else " (one seed's test detects no difference of this metric with 80 % power)."
            )
        )
    return lines


def power_section(detectable: pd.DataFrame) -> list[str]:
    if detectable.empty:
        return []
    lines = [
        "",
        "## What this test set can detect (power 80 %)",
        "",
        "The smallest true difference one seed's paired test finds with 80 % probability, from "
        "this grid's own "
        "standard errors (DeLong, for AUC) and discordant shares (McNemar, for sensitivity): at "
        "alpha 0.05, and at "
        "Holm's strictest level (alpha divided by the number of tests in the family). A smaller "
        "true effect "
        "will usually be missed, so a non-significant result here does not show that the methods "
        "are equal.",
        "",
        *table_head(
            [
                "backbone",
                "split",
                "test images (positive)",
                "baseline AUC",
                "baseline sensitivity",
                "SE of AUC difference",
            ]
            + [
                "detectable AUC difference (0.05 / Holm)",
                "detectable sensitivity difference (0.05 / Holm)",
            ]
        ),
    ]
    for _, r in detectable.iterrows():
        lines.append(
            f"| {r['backbone']} | {r['split']} | {r['n_test']} ({r['n_positive']}) | "
            f"{r['baseline_auc']:.3f} | "
            f"{r['baseline_sensitivity']:.3f} | {r['se_auc_difference']:.4f} | "
            f"{r['detectable_auc']:.3f} / "
            f"{r['detectable_auc_holm']:.3f} | "
            f"{detectable_text(r['detectable_sensitivity'], r['discordant_positive_share'])} / "
            f"{detectable_text(r['detectable_sensitivity_holm'], r['discordant_positive_share'])} |"
        )
    lines += [
        "",
        "A sensitivity difference can be no larger than the share of positive images on which the "
        "two models "
        "disagree; where even that largest difference would be found with less than 80 % "
        "probability, the table "
        "says *none* (with the observed share).",
    ]
    return lines


def detectable_text(value: float, discordant: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) else f"none (disagree on {discordant:.3f})"


def interval_text(low: float, high: float) -> str:
    return (
        f"[{low:+.3f}, {high:+.3f}]"
        if np.isfinite(low) and np.isfinite(high)
        else "(one seed: no interval)"
    )


def paired_section(paired: pd.DataFrame) -> list[str]:
    lines = ["", "## Paired comparisons with the ImageNet baseline (same images, same seed)", ""]
    if paired.empty:
        return lines + [
            "No MSTL run has an ImageNet baseline of the same backbone, split and seed: nothing to "
            "compare."
        ]
    for data, rows in paired.groupby("data", sort=False):
        where = "the COVID-CT test split" if data == "test" else f"the external set {data}"
        lines += [
            f"### On {where}",
            "",
            *table_head(
                [
                    "backbone",
                    "split",
                    "seed",
                    "strategy",
                    "metric",
                    "difference [95 % CI]",
                    "test",
                    "p",
                    "p (Holm)",
                ]
                + ["runs (MSTL, baseline)"]
            ),
        ]
        for _, r in rows.iterrows():
            lines.append(
                f"| {r['backbone']} | {r['split']} | {r['seed']} | {r['strategy']} | {r['metric']} "
                "| "
                f"{r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {r['test']} | "
                f"{r['p_value']:.3g} | "
                f"{r['p_holm']:.3g} | {short([r['run_id'], r['baseline_run_id']])} |"
            )
        significant = rows[rows["significant"]]
        n_sig, better = len(significant), int((significant["difference"] > 0).sum())
        holm_sig = rows[rows["significant_holm"]]
        lines += [
            "",
            f"{n_sig} of {len(rows)} paired differences are significant at 0.05 without correction "
            "for "
            f"multiple comparisons: {better} favour MSTL, {n_sig - better} favour the ImageNet "
            "baseline. "
            f"With Holm's correction across these {len(rows)} tests, {len(holm_sig)} remain "
            f"({int((holm_sig['difference'] > 0).sum())} favouring MSTL)."
            + (
                ""
                if n_sig
                else " None of the differences is significant: on these images MSTL and the "
                "ImageNet baseline cannot be told apart."
            ),
            "",
        ]
    return lines


def markdown_report(
    table: pd.DataFrame,
    paired: pd.DataFrame,
    best: pd.DataFrame,
    target_recall: float,
    external: pd.DataFrame | None = None,
    summary: pd.DataFrame | None = None,
    detectable: pd.DataFrame | None = None,
    provenance: str = "",
) -> str:
    lines = ["# MSTL against the ImageNet baseline", ""]
    if provenance:
        lines += [provenance, ""]
    lines += ["## Table III (test split)", ""]
    header = (
        ["backbone", "strategy", "split", "image size", "epochs", "seeds"]
        + list(METRIC_NAMES)
        + ["runs"]
    )
    lines += table_head(header)
    for _, r in table.iterrows():
        cells = [
            r["backbone"],
            r["strategy"],
            r["split"],
            str(r["image_size"]),
            str(r["epochs"]),
            str(r["seeds"]),
        ]
        cells += [f"{r[m]:.3f} {r[f'{m}_ci']}" for m in METRIC_NAMES]
        cells.append(short(str(r["run_ids"]).split(",")))
        lines.append(table_row(cells))
    lines += [
        "",
        f"## Operating point: threshold chosen on validation for sensitivity ≥ {target_recall}",
        "",
        *table_head(
            ["backbone", "strategy", "split", "threshold", "test sensitivity", "test specificity"]
        ),
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['backbone']} | {r['strategy']} | {r['split']} | {r['val_threshold']:.3f} | "
            f"{r['test_recall_at_threshold']:.3f} | {r['test_specificity_at_threshold']:.3f} |"
        )
    if summary is not None and detectable is not None and not paired.empty:
        lines += answer_section(summary, detectable)
        lines += power_section(detectable)
        lines += ["", "![forest plot of the paired differences](forest_test.png)"]
    lines += external_section(pd.DataFrame() if external is None else external)
    lines += paired_section(paired)
    lines += [
        "",
        "## Figures",
        "",
        "![ROC per architecture](fig5_roc_per_architecture.png)",
        "",
        "![ROC per strategy](fig6_roc_per_strategy.png)",
        "",
        "The champion `promote` would choose (highest validation recall, ties by validation AUC) "
        "and the runner-up: "
        + ", ".join(
            f"{r['backbone']}/{r['strategy']} {r['split']} seed {r['seed']} (run {r['run_id']}: "
            "validation recall "
            f"{r['val_recall']:.3f}; test AUC {r['metrics'].get('test_roc_auc', np.nan):.3f}, "
            "sensitivity "
            f"{r['metrics'].get('test_recall', np.nan):.3f}, specificity "
            f"{r['metrics'].get('test_specificity', np.nan):.3f})"
            for _, r in best.iterrows()
        ),
        "",
    ]
    lines += [f"![confusion matrix {i + 1}](fig7_confusion_{i + 1}.png)" for i in range(len(best))]
    return "\n".join(lines) + "\n"


RESULTS_START, RESULTS_END = "<!-- mstl:results:start -->", "<!-- mstl:results:end -->"


def write_results_doc(report_dir: Path, doc: Path) -> None:
    """Put the report into ``doc`` between the results markers (appended when they are missing), one
    heading
    level down, with its figures copied to ``<doc folder>/results/``: documentation generated, not
    typed."""
    figures = doc.parent / "results"
    figures.mkdir(parents=True, exist_ok=True)
    for png in report_dir.glob("*.png"):
        shutil.copyfile(png, figures / png.name)
    body = (report_dir / "report.md").read_text()
    body = "\n".join(("#" + line) if line.startswith("#") else line for line in body.splitlines())
    body = body.replace("](fig", "](results/fig").replace("](forest", "](results/forest")
    block = f"{RESULTS_START}\n{body}\n{RESULTS_END}"
    text = doc.read_text() if doc.exists() else ""
    if RESULTS_START in text and RESULTS_END in text:
        text = (
            text[: text.index(RESULTS_START)]
            + block
            + text[text.index(RESULTS_END) + len(RESULTS_END) :]
        )
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    doc.write_text(text)
