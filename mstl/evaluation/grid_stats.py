"""What a grid of Target runs says about MSTL against the ImageNet baseline, with the statistics a
reader needs to trust it: paired tests per seed on the same images, Holm's correction across the
family, the per-seed differences with confidence intervals (a forest plot), their mean over seeds,
and the smallest differences the test set could have detected (power), so a null result can be read
for what it is.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from mstl.evaluation.external import patient_ids
from mstl.evaluation.metrics import ACCURACY, PAIRED_SHOWN, RECALL, ROC_AUC
from mstl.evaluation.stats import (
    CLUSTER_TEST,
    cluster_paired_tests,
    detectable_auc_difference,
    detectable_paired_proportion_difference,
    holm,
    paired_tests,
)

BASELINE = "imagenet"
# Runs are grouped (and paired with their baseline) only with the same setting; a seed is a
# replicate.
SETTING = ["backbone", "strategy", "split", "image_size", "epochs"]
ALPHA = 0.05
POWER = 0.8
AUC, SENSITIVITY = ROC_AUC.paired, RECALL.paired  # "auc", "sensitivity": keys of paired tests
TEST_NAMES = {AUC: "DeLong", ACCURACY.paired: "McNemar (exact)", SENSITIVITY: "McNemar (exact)"}


def baseline_pairs(runs: pd.DataFrame):
    """Each MSTL run with the ImageNet baseline run of the same setting and seed."""
    for _, run in runs[runs["strategy"] != BASELINE].iterrows():
        same = np.logical_and.reduce(
            [runs[k] == run[k] for k in SETTING if k != "strategy"] + [runs["seed"] == run["seed"]]
        )
        base = runs[same & (runs["strategy"] == BASELINE)]
        if not base.empty:
            yield run, base.iloc[0]


def paired_rows(
    run, base, ours: pd.DataFrame, theirs: pd.DataFrame, key: str, data: str
) -> list[dict]:
    """The paired tests of two runs' predictions on the same images (joined on ``key``), as report
    rows: on an external set whose patients are known, by resampling patients
    (``cluster_paired_tests``), else DeLong and McNemar on the images."""
    joined = ours.merge(theirs[[key, "probability"]], on=key, suffixes=("", "_base"))
    if len(joined) != len(ours) or len(joined) != len(theirs):
        raise ValueError(
            f"runs {run['run_id']} and {base['run_id']} were scored on different images of {data}"
        )
    y = joined["label"].to_numpy().astype(int)
    patients = None if data == "test" else patient_ids(joined)
    scores = (y, joined["probability"], joined["probability_base"], run["threshold"])
    tests = paired_tests(*scores) if patients is None else cluster_paired_tests(*scores, patients)
    ours_right = (joined["probability"].to_numpy() >= run["threshold"]) == y
    base_right = (joined["probability_base"].to_numpy() >= run["threshold"]) == y
    pairs = {AUC: None, ACCURACY.paired: np.ones(len(y), bool), SENSITIVITY: y == 1}
    rows = []
    for metric, result in tests.items():
        low, high = result.interval(1 - ALPHA)
        mask = pairs[metric]
        rows.append(
            {
                "data": data,
                "backbone": run["backbone"],
                "split": run["split"],
                "image_size": run["image_size"],
                "epochs": run["epochs"],
                "seed": run["seed"],
                "strategy": run["strategy"],
                "metric": metric,
                "difference": result.difference,
                "ci_low": low,
                "ci_high": high,
                "se": result.se,
                "p_value": result.p_value,
                "test": TEST_NAMES[metric] if patients is None else CLUSTER_TEST,
                "significant": result.p_value < ALPHA,
                "n": int(len(y) if mask is None else mask.sum()),
                "discordant": float("nan")
                if mask is None
                else float((ours_right[mask] != base_right[mask]).mean()),
                "run_id": run["run_id"],
                "baseline_run_id": base["run_id"],
            }
        )
    return rows


def comparisons(runs: pd.DataFrame, external: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each MSTL run against the ImageNet baseline of the same setting and seed, on the same test
    images, and on every external data set on which both were evaluated (the same files, by content
    hash). ``p_holm`` is Holm-adjusted within each data set's family of tests (every strategy,
    split, seed and metric)."""
    out = []
    scored = (
        {} if external is None else {(r["run_id"], r["digest"]): r for _, r in external.iterrows()}
    )
    digests = sorted({digest for _, digest in scored})
    for run, base in baseline_pairs(runs):
        out += paired_rows(run, base, run["test"], base["test"], "file", "test")
        for digest in digests:
            if (run["run_id"], digest) in scored and (base["run_id"], digest) in scored:
                ours, theirs = scored[(run["run_id"], digest)], scored[(base["run_id"], digest)]
                out += paired_rows(
                    run, base, ours["predictions"], theirs["predictions"], "sha256", ours["data"]
                )
    paired = pd.DataFrame(out)
    if paired.empty:
        return paired
    paired["p_holm"] = np.nan
    for _, index in paired.groupby("data", sort=False).groups.items():
        paired.loc[index, "p_holm"] = holm(paired.loc[index, "p_value"].to_numpy())
    paired["significant_holm"] = paired["p_holm"] < ALPHA
    return paired


def over_seeds(paired: pd.DataFrame) -> pd.DataFrame:
    """Per data set, setting and metric: the mean paired difference over seeds with a t interval
    (seeds as replicates of the whole training), how many seeds favour MSTL, and how many are
    significant after Holm."""
    rows = []
    keys = ["data", "backbone", "split", "image_size", "epochs", "strategy", "metric"]
    for key, group in paired.groupby(keys, sort=False):
        d = group["difference"].to_numpy()
        mean = float(d.mean())
        if len(d) > 1:
            half = float(stats.t.ppf(1 - ALPHA / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
            p = float(stats.ttest_1samp(d, 0.0).pvalue) if d.std(ddof=1) > 0 else float("nan")
        else:
            half, p = float("nan"), float("nan")
        rows.append(
            dict(zip(keys, key, strict=True))
            | {
                "seeds": len(d),
                "mean_difference": mean,
                "ci_low": mean - half,
                "ci_high": mean + half,
                "p_over_seeds": p,
                "seeds_favouring_mstl": int((d > 0).sum()),
                "seeds_significant_holm": int(group["significant_holm"].sum()),
                "run_ids": ",".join(group["run_id"]),
            }
        )
    return pd.DataFrame(rows)


def detectable_differences(
    runs: pd.DataFrame,
    paired: pd.DataFrame,
    external: pd.DataFrame | None = None,
    power: float = POWER,
) -> pd.DataFrame:
    """Per data set (the test split, each external set) and setting: the smallest AUC and
    sensitivity differences a single seed's paired test detects with ``power`` at alpha 0.05 and at
    Holm's strictest level (alpha / the data set's family size), from the observed standard errors
    (DeLong) and discordant shares (McNemar) of this grid's pairs."""
    rows = []
    keys = ["backbone", "split", "image_size", "epochs"]
    for (data, *key), group in paired.groupby(["data", *keys], sort=False):
        family = int((paired["data"] == data).sum())
        auc, sens = group[group["metric"] == AUC], group[group["metric"] == SENSITIVITY]
        se, discordant, n_pos = (
            float(auc["se"].median()),
            float(sens["discordant"].median()),
            int(sens["n"].median()),
        )
        row = {"data": data} | dict(zip(keys, key, strict=True))
        row |= baseline_figures(runs, external, data, dict(zip(keys, key, strict=True)))
        row |= {
            "n_test": int(auc["n"].median()),
            "n_positive": n_pos,
            "se_auc_difference": se,
            "discordant_positive_share": discordant,
        }
        by_patient = bool((sens["test"] == CLUSTER_TEST).all())
        for label, alpha in (("", ALPHA), ("_holm", ALPHA / max(family, 1))):
            row[f"detectable_{AUC}{label}"] = detectable_auc_difference(se, alpha, power)
            row[f"detectable_{SENSITIVITY}{label}"] = (
                detectable_auc_difference(float(sens["se"].median()), alpha, power)
                if by_patient
                else detectable_paired_proportion_difference(n_pos, discordant, alpha, power)
                if discordant > 0
                else float("nan")
            )
        rows.append(row)
    return pd.DataFrame(rows)


def baseline_figures(
    runs: pd.DataFrame, external: pd.DataFrame | None, data: str, setting: dict
) -> dict[str, float]:
    """The ImageNet baseline's mean AUC and sensitivity over seeds on ``data``: from the Target
    runs' test metrics, or from their evaluate runs on an external set."""
    base = runs[
        np.logical_and.reduce([runs[k] == v for k, v in setting.items()])
        & (runs["strategy"] == BASELINE)
    ]
    if data == "test":
        metrics, key = list(base["metrics"]), {m.paired: f"test_{m.name}" for m in PAIRED_SHOWN}
    else:
        scored = external[(external["data"] == data) & external["run_id"].isin(base["run_id"])]
        metrics, key = list(scored["metrics"]), {m.paired: m.clinical for m in PAIRED_SHOWN}
    return {
        f"baseline_{name}": float(np.mean([m.get(k, np.nan) for m in metrics]))
        if metrics
        else float("nan")
        for name, k in key.items()
    }


def seed_summary(
    metrics: pd.Series, key: str, interval_when_missing: bool = True
) -> tuple[float, str]:
    """The mean of ``key`` over the runs' ``metrics``, and its spread as text: the run's interval
    (one run), or the SD over seeds (several; empty with fewer than two values)."""
    values = [m[key] for m in metrics if key in m]
    mean = float(np.mean(values)) if values else float("nan")
    if len(metrics) == 1 and (values or interval_when_missing):
        m = metrics.iloc[0]
        low, high = m.get(f"{key}_ci_low", np.nan), m.get(f"{key}_ci_high", np.nan)
        return mean, f"[{low:.3f}, {high:.3f}]"
    return mean, f"± {np.std(values, ddof=1):.3f} (SD over seeds)" if len(values) > 1 else ""


def grid_counts(runs: pd.DataFrame, paired: pd.DataFrame, external: pd.DataFrame) -> dict:
    """What a compare run logs as metrics: the Target runs, the paired differences significant
    without and with Holm's correction, and the external data sets."""
    return {
        "n_target_runs": len(runs),
        "n_significant": int(paired["significant"].sum()) if len(paired) else 0,
        "n_significant_holm": int(paired["significant_holm"].sum()) if len(paired) else 0,
        "n_external_sets": int(external["digest"].nunique()) if len(external) else 0,
    }


def forest_figure(paired: pd.DataFrame, summary: pd.DataFrame, data: str = "test"):
    """Per-seed paired differences (MSTL - ImageNet) with 95 % intervals, and their mean over seeds
    (diamond), for AUC and sensitivity, one row per split, strategy and seed."""
    rows = paired[(paired["data"] == data) & (paired["metric"] == AUC)]
    height = 0.32 * (len(rows) + 2 * rows.groupby(["split", "strategy"]).ngroups) + 1.5
    fig, axes = plt.subplots(1, len(PAIRED_SHOWN), figsize=(11, height), dpi=110)
    for ax, metric in zip(axes, PAIRED_SHOWN, strict=True):
        table = paired[(paired["data"] == data) & (paired["metric"] == metric.paired)]
        mean = summary[(summary["data"] == data) & (summary["metric"] == metric.paired)]
        labels = forest_panel(ax, table, mean)
        ax.axvline(0, color="grey", lw=1, ls="--")
        ax.set_yticks([-i for i in range(len(labels))], labels, fontsize=7)
        ax.set_xlabel(f"{metric.label} difference, MSTL - ImageNet (95 % CI)")
    fig.suptitle(
        f"Paired differences on {'the COVID-CT test split' if data == 'test' else data} (red: "
        "significant after Holm)"
    )
    fig.tight_layout()
    return fig


def forest_panel(ax, table: pd.DataFrame, summary: pd.DataFrame) -> list[str]:
    """One metric's panel: each setting's seeds top-down, then their mean; returns row labels."""
    y, labels = 0, []
    for (backbone, split, strategy), group in table.groupby(
        ["backbone", "split", "strategy"], sort=True
    ):
        for _, r in group.sort_values("seed").iterrows():
            colour = "tab:red" if r["significant_holm"] else "black"
            interval_marker(ax, r["difference"], r["ci_low"], r["ci_high"], -y, "o", 3, colour, 2)
            labels.append(f"{split} {strategy} s{r['seed']}")
            y += 1
        s = summary[
            (summary["split"] == split)
            & (summary["strategy"] == strategy)
            & (summary["backbone"] == backbone)
        ]
        if len(s):
            s = s.iloc[0]
            interval_marker(
                ax, s["mean_difference"], s["ci_low"], s["ci_high"], -y, "D", 6, "tab:blue", 3
            )
            labels += [f"{split} {strategy}: mean of {s['seeds']}", ""]
            y += 2
    return labels


def interval_marker(ax, value, low, high, y, marker, size, colour, cap) -> None:
    """A point at ``value`` with error bars to ``low`` and ``high`` (none when they are NaN)."""
    xerr = [[value - low], [high - value]] if np.isfinite(low) else None
    ax.errorbar(value, y, xerr=xerr, fmt=marker, ms=size, color=colour, capsize=cap)
