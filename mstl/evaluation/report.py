"""The `compare` stage: the paper's Table III and Figures 5-7 from the Target runs on a tracking server,
with confidence intervals, paired tests against the ImageNet baseline, and an operating point chosen on
validation data. Written as Markdown + PNG + CSV and logged as the compare run's artifacts.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from mstl import defaults
from mstl.evaluation.metrics import METRIC_NAMES, point_metrics
from mstl.evaluation.plots import confusion_figure
from mstl.evaluation.stats import paired_tests, threshold_for_recall
from mstl.tracking import log_params, start_stage_run, tracking_uri

BASELINE = "imagenet"
# Runs are grouped (and paired with their baseline) only with the same setting; a seed is a replicate.
SETTING = ["backbone", "strategy", "split", "image_size", "epochs"]
ALPHA = 0.05


@dataclass(frozen=True)
class CompareParams:
    """Parameters of `-e compare`."""

    search_experiment: str = defaults.EXPERIMENT_NAME
    parent_run: str = ""  # only Target runs under this run (e.g. one experiment grid), at any depth
    target_recall: float = 0.95
    out_dir: str = "exports/report"
    experiment: str = defaults.EXPERIMENT_NAME

    def validate(self) -> None:
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")


def descends_from(run, ancestor: str, parents: dict[str, str]) -> bool:
    current = run.data.tags.get("mlflow.parentRunId")
    while current:
        if current == ancestor:
            return True
        current = parents.get(current)
    return False


def grid_members(client, run_id: str, tmp: Path) -> set[str] | None:
    """The run IDs of an experiment grid's cells, whichever worker ran them and whether reused
    (its ``grid/cells.csv``); None for a run that is not a grid."""
    if "grid/cells.csv" not in {a.path for a in client.list_artifacts(run_id, "grid")}:
        return None
    return set(pd.read_csv(client.download_artifacts(run_id, "grid/cells.csv", str(tmp)))["run_id"])


def collect(client, experiment_name: str, tmp: Path, parent_run: str = "") -> pd.DataFrame:
    """One row per finished Target run (under ``parent_run`` when given): tags, seed, metrics, val/test predictions."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"no experiment named {experiment_name!r} on {tracking_uri()}")
    everything = client.search_runs([experiment.experiment_id], max_results=50_000)
    parents = {r.info.run_id: r.data.tags.get("mlflow.parentRunId", "") for r in everything}
    members = grid_members(client, parent_run, tmp) if parent_run else None
    runs = [
        r
        for r in everything
        if r.data.tags.get("stage") == "target"
        and r.info.status == "FINISHED"
        and (not parent_run or (r.info.run_id in members if members is not None else descends_from(r, parent_run, parents)))
    ]
    if not runs:
        where = f"under run {parent_run}" if parent_run else f"in experiment {experiment_name!r}"
        raise ValueError(f"no finished Target run {where}")
    rows = []
    for run in runs:
        folder = tmp / run.info.run_id
        folder.mkdir()
        predictions = {
            part: pd.read_csv(client.download_artifacts(run.info.run_id, f"predictions/{part}.csv", str(folder)))
            for part in ("val", "test")
        }
        rows.append(
            {
                "run_id": run.info.run_id,
                "backbone": run.data.tags.get("backbone"),
                "strategy": run.data.tags.get("strategy"),
                "split": run.data.tags.get("split"),
                "seed": int(run.data.params.get("seed", 0)),
                "image_size": int(run.data.params.get("image_size", 0)),
                "epochs": int(run.data.params.get("epochs", 0)),
                "threshold": float(run.data.params.get("threshold", defaults.THRESHOLD)),
                "metrics": run.data.metrics,
                "val": predictions["val"],
                "test": predictions["test"],
            }
        )
    return pd.DataFrame(rows)


def table_iii(runs: pd.DataFrame, target_recall: float) -> pd.DataFrame:
    """Per backbone x strategy x split: each metric as value [CI] (one seed) or mean ± SD (several)."""
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
                row[f"{name}_ci"] = f"[{m.get(f'test_{name}_ci_low', np.nan):.3f}, {m.get(f'test_{name}_ci_high', np.nan):.3f}]"
            else:
                row[f"{name}_ci"] = f"± {np.std(values, ddof=1):.3f} (SD over seeds)"
        operating = []
        for _, run in group.iterrows():
            t = threshold_for_recall(run["val"]["label"], run["val"]["probability"], target_recall)
            at = point_metrics(run["test"]["label"], run["test"]["probability"], t)
            operating.append((t, at["recall"], at["specificity"]))
        row["val_threshold"], row["test_recall_at_threshold"], row["test_specificity_at_threshold"] = np.mean(operating, axis=0)
        out.append(row)
    return pd.DataFrame(out)


def comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """Each MSTL run against the ImageNet baseline of the same setting and seed, on the same test images."""
    out = []
    for _, run in runs[runs["strategy"] != BASELINE].iterrows():
        same = np.logical_and.reduce([runs[k] == run[k] for k in SETTING if k != "strategy"] + [runs["seed"] == run["seed"]])
        base = runs[same & (runs["strategy"] == BASELINE)]
        if base.empty:
            continue
        base = base.iloc[0]
        joined = run["test"].merge(base["test"], on="file", suffixes=("", "_base"))
        if len(joined) != len(run["test"]):
            raise ValueError(f"runs {run['run_id']} and {base['run_id']} were tested on different images")
        tests = paired_tests(joined["label"], joined["probability"], joined["probability_base"], run["threshold"])
        for metric, result in tests.items():
            out.append(
                {
                    "backbone": run["backbone"],
                    "split": run["split"],
                    "seed": run["seed"],
                    "strategy": run["strategy"],
                    "metric": metric,
                    "difference": result.difference,
                    "p_value": result.p_value,
                    "test": "DeLong" if metric == "auc" else "McNemar (exact)",
                    "significant": result.p_value < ALPHA,
                    "run_id": run["run_id"],
                    "baseline_run_id": base["run_id"],
                }
            )
    return pd.DataFrame(out)


def roc_panel(runs: pd.DataFrame, key: str, title: str):
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    first = runs.sort_values("seed").groupby(SETTING).head(1)
    groups = list(first.groupby(key))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4), dpi=110, squeeze=False)
    for ax, (name, group) in zip(axes[0], groups, strict=False):
        for _, run in group.iterrows():
            y, p = run["test"]["label"], run["test"]["probability"]
            fpr, tpr, _ = roc_curve(y, p)
            other = run["strategy"] if key == "backbone" else run["backbone"]
            ax.plot(fpr, tpr, label=f"{other} ({run['split']}, {run['image_size']} px) AUC {roc_auc_score(y, p):.3f}")
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        ax.set(title=f"{name}", xlabel="1 - specificity", ylabel="sensitivity")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def markdown_report(table: pd.DataFrame, paired: pd.DataFrame, best: pd.DataFrame, target_recall: float) -> str:
    lines = ["# MSTL against the ImageNet baseline", "", "## Table III (test split)", ""]
    header = ["backbone", "strategy", "split", "image size", "epochs", "seeds"] + list(METRIC_NAMES)
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for _, r in table.iterrows():
        cells = [r["backbone"], r["strategy"], r["split"], str(r["image_size"]), str(r["epochs"]), str(r["seeds"])]
        cells += [f"{r[m]:.3f} {r[f'{m}_ci']}" for m in METRIC_NAMES]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Operating point: threshold chosen on validation for sensitivity ≥ {target_recall}",
        "",
        "| backbone | strategy | split | threshold | test sensitivity | test specificity |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['backbone']} | {r['strategy']} | {r['split']} | {r['val_threshold']:.3f} | "
            f"{r['test_recall_at_threshold']:.3f} | {r['test_specificity_at_threshold']:.3f} |"
        )
    lines += ["", "## Paired comparisons with the ImageNet baseline (same test images)", ""]
    if paired.empty:
        lines.append("No MSTL run has an ImageNet baseline of the same backbone, split and seed: nothing to compare.")
    else:
        lines += [
            "| backbone | split | seed | strategy | metric | difference (MSTL - baseline) | test | p | significant at 0.05 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for _, r in paired.iterrows():
            lines.append(
                f"| {r['backbone']} | {r['split']} | {r['seed']} | {r['strategy']} | {r['metric']} | "
                f"{r['difference']:+.3f} | {r['test']} | {r['p_value']:.3g} | {'yes' if r['significant'] else 'no'} |"
            )
        significant = paired[paired["significant"]]
        n_sig, better = len(significant), int((significant["difference"] > 0).sum())
        bonferroni = paired[paired["p_value"] < ALPHA / len(paired)]
        lines += [
            "",
            f"{n_sig} of {len(paired)} paired differences are significant at 0.05 without correction for "
            f"multiple comparisons: {better} favour MSTL, {n_sig - better} favour the ImageNet baseline. "
            f"With a Bonferroni correction (p < {ALPHA / len(paired):.2g}) {len(bonferroni)} remain "
            f"({int((bonferroni['difference'] > 0).sum())} favouring MSTL)."
            + (
                ""
                if n_sig
                else " None of the differences is significant: on these test images MSTL and the "
                "ImageNet baseline cannot be told apart."
            ),
        ]
    lines += [
        "",
        "## Figures",
        "",
        "![ROC per architecture](fig5_roc_per_architecture.png)",
        "",
        "![ROC per strategy](fig6_roc_per_strategy.png)",
        "",
        "Two best models (highest validation recall, ties by validation AUC): "
        + ", ".join(f"{r['backbone']}/{r['strategy']} ({r['run_id'][:8]})" for _, r in best.iterrows()),
        "",
    ]
    lines += [f"![confusion matrix {i + 1}](fig7_confusion_{i + 1}.png)" for i in range(len(best))]
    return "\n".join(lines) + "\n"


def run_compare(params: CompareParams) -> str:
    params.validate()
    client = mlflow.MlflowClient(tracking_uri())
    with tempfile.TemporaryDirectory() as tmp, start_stage_run(params.experiment, "compare") as run:
        mlflow.set_tag("stage", "compare")
        log_params({k: v for k, v in asdict(params).items() if k != "experiment"})
        runs = collect(client, params.search_experiment, Path(tmp), params.parent_run)
        out = Path(params.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        table = table_iii(runs, params.target_recall)
        paired = comparisons(runs)
        table.to_csv(out / "table_iii.csv", index=False)
        paired.to_csv(out / "paired_tests.csv", index=False)
        roc_panel(runs, "backbone", "Figure 5: ROC per architecture").savefig(out / "fig5_roc_per_architecture.png")
        roc_panel(runs, "strategy", "Figure 6: ROC per strategy").savefig(out / "fig6_roc_per_strategy.png")
        ranked = (
            runs.assign(
                val_recall=[m.get("val_recall", np.nan) for m in runs["metrics"]],
                val_auc=[m.get("val_roc_auc", np.nan) for m in runs["metrics"]],
            )
            .sort_values(["val_recall", "val_auc"], ascending=False)
            .head(2)
        )
        for i, (_, r) in enumerate(ranked.iterrows()):
            confusion_figure(
                r["test"]["label"], r["test"]["probability"], r["threshold"], title=f"{r['backbone']} / {r['strategy']} (test)"
            ).savefig(out / f"fig7_confusion_{i + 1}.png")
        (out / "report.md").write_text(markdown_report(table, paired, ranked, params.target_recall))
        import matplotlib.pyplot as plt

        plt.close("all")
        mlflow.log_artifacts(str(out), "report")
        mlflow.log_metrics({"n_target_runs": len(runs), "n_significant": int(paired["significant"].sum()) if len(paired) else 0})
        print(f"compare: {len(runs)} Target runs; report in {out / 'report.md'}")
        return run.info.run_id
