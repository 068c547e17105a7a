"""compare's view of the external sets the grid's models were evaluated on (their `evaluate`
runs): per setting, the figures at the served threshold and at the threshold each Target run chose
on its own COVID-CT validation split (the operating point of Table III's operating section), and
per patient over seeds, so 296 slices of 6 patients are read as 6 patients.

A patient's score is the mean of their slices' probabilities and their label the maximum of their
slices' labels (``external.patient_table``, the rule `evaluate` states in ``patients.csv``).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from mstl.evaluation.external import patient_ids, patient_table
from mstl.evaluation.grid_stats import SETTING, seed_summary
from mstl.evaluation.markdown import table_head, table_row
from mstl.evaluation.metrics import HEADLINE, RECALL, SPECIFICITY, compute
from mstl.evaluation.stats import threshold_for_recall

AT_VAL = ("sensitivity_at_val_threshold", "specificity_at_val_threshold")
# evaluate's shortcut probes (``probes.shortcut_probes``): does the model read the lungs?
PROBES = {"lung_attention": "lung attention", "masked_lung_auc": "masked-lung AUC"}
STRATEGY_COLOURS = {
    "imagenet": "tab:grey",
    "scratch": "tab:grey",
    "hard": "tab:blue",
    "soft": "tab:orange",
}


def validation_threshold(run, target_recall: float) -> float:
    """The threshold a Target run chose on its validation split for ``target_recall``."""
    return threshold_for_recall(run["val"]["label"], run["val"]["probability"], target_recall)


def scored_runs(runs: pd.DataFrame, external: pd.DataFrame) -> pd.DataFrame:
    """One row per Target run and external set: the run's setting and seed, its validation
    predictions and the evaluate run's metrics and predictions."""
    return external.merge(runs.drop(columns=["metrics"]), on="run_id")


def per_patient(scored: pd.DataFrame, target_recall: float) -> pd.DataFrame:
    """Per Target run, external set and patient: label, slices, mean probability, and whether the
    patient is called positive at the run's validation-chosen threshold and at its served one."""
    frames = []
    for _, r in scored.iterrows():
        predictions = r["predictions"]
        ids = patient_ids(predictions)
        if ids is None:
            continue
        slices = predictions.assign(patient_id=ids)
        t = validation_threshold(r, target_recall)
        at_val = patient_table(slices, slices["probability"], t)
        served = patient_table(slices, slices["probability"], r["threshold"]).set_index(
            "patient_id"
        )
        at_val["called_at_served_threshold"] = at_val["patient_id"].map(served["predicted"])
        frames.append(
            at_val.rename(columns={"predicted": "called_at_val_threshold"}).assign(
                data=r["data"],
                digest=r["digest"],
                seed=r["seed"],
                run_id=r["run_id"],
                val_threshold=t,
                **{k: r[k] for k in SETTING},
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def at_validation_threshold(scored: pd.DataFrame, target_recall: float) -> pd.DataFrame:
    """Per Target run and external set: its validation-chosen threshold and the external slices'
    sensitivity and specificity at it, and (where patients are known, from ``per_patient``) the
    patients it gets right there."""
    rows = []
    for _, r in scored.iterrows():
        predictions, t = r["predictions"], validation_threshold(r, target_recall)
        at = compute((RECALL, SPECIFICITY), predictions["label"], predictions["probability"], t)
        row = {"run_id": r["run_id"], "digest": r["digest"], "val_threshold": t}
        rows.append(row | dict(zip(AT_VAL, (at[RECALL.name], at[SPECIFICITY.name]), strict=True)))
    chosen = pd.DataFrame(rows)
    patients = per_patient(scored, target_recall)
    if patients.empty:
        return chosen
    right = patients.assign(right=patients["outcome"].isin(("tp", "tn")))
    counts = right.groupby(["run_id", "digest"]).agg(
        patients_right=("right", "sum"), patients=("right", "size")
    )
    return chosen.merge(counts.reset_index(), on=["run_id", "digest"], how="left")


def external_table(
    runs: pd.DataFrame, external: pd.DataFrame, target_recall: float = 0.95
) -> pd.DataFrame:
    """Per external data set and setting: the ``HEADLINE`` metrics at the served threshold (value
    [CI] for one seed, mean ± SD for several), and the mean over seeds of the validation-chosen
    threshold, sensitivity and specificity at it, and the patients right there."""
    if external.empty:
        return pd.DataFrame()
    scored = scored_runs(runs, external)
    chosen = at_validation_threshold(scored, target_recall)
    scored = scored.merge(chosen, on=["run_id", "digest"])
    out = []
    for (data, digest, *setting), group in scored.groupby(["data", "digest", *SETTING]):
        row = {"data": data, "digest": digest, **dict(zip(SETTING, setting, strict=True))}
        row |= {"seeds": len(group)}
        row["n_images"] = int(np.median([len(p) for p in group["predictions"]]))
        for name in (m.clinical for m in HEADLINE):
            row[name], row[f"{name}_ci"] = seed_summary(group["metrics"], name, False)
        for name in ("val_threshold", *AT_VAL):
            row[name] = float(group[name].mean())
        for name in PROBES:
            row[name] = float(np.mean([m.get(name, np.nan) for m in group["metrics"]]))
        if "patients" in group and group["patients"].notna().all():
            row["patients_right"] = float(group["patients_right"].mean())
            row["patients"] = int(group["patients"].max())
        row["evaluate_run_ids"] = ",".join(group["evaluate_run_id"])
        out.append(row)
    return pd.DataFrame(out)


def patients_over_seeds(patients: pd.DataFrame) -> pd.DataFrame:
    """Per external set, setting and patient: mean (and SD) over seeds of the patient's mean
    probability, and in how many seeds the patient was called positive."""
    if patients.empty:
        return patients
    keys = ["data", *SETTING, "patient_id", "label", "n_slices"]
    out = patients.groupby(keys, sort=False).agg(
        seeds=("seed", "size"),
        mean_probability=("mean_probability", "mean"),
        sd_probability=("mean_probability", "std"),
        called_at_val_threshold=("called_at_val_threshold", "sum"),
        called_at_served_threshold=("called_at_served_threshold", "sum"),
    )
    return out.reset_index().sort_values(
        ["data", *SETTING, "label", "patient_id"],
        ascending=[True] * (len(SETTING) + 1) + [False, True],
    )


def external_section(external: pd.DataFrame, target_recall: float) -> list[str]:
    """The external table in Markdown: each setting on each external set it was evaluated on."""
    if external.empty:
        return []
    header = ["data (digest)", "images", "backbone", "strategy", "split", "seeds"]
    header += [f"{m.label} (served threshold)" for m in HEADLINE]
    header += ["val threshold", "sensitivity / specificity at it", "patients right at it"]
    header += list(PROBES.values())
    lines = [
        "",
        "## External validation (`evaluate` runs of these models)",
        "",
        "At the served threshold (0.5 unless the Target chose another), and at the threshold each "
        f"run chose on its own COVID-CT validation split for sensitivity ≥ {target_recall} (as in "
        "the operating-point table): the mean over seeds. A patient is called positive when the "
        "mean of their slices' probabilities reaches the threshold. Lung attention: the share of "
        "the Grad-CAM heat inside the lung field; masked-lung AUC: the AUC with the lungs blanked "
        "out (near 0.5 when the lungs carry the decision; `docs/evaluation.md`).",
        "",
        *table_head(header),
    ]
    for _, r in external.iterrows():
        cells = [f"{r['data']} ({r['digest']})", str(r["n_images"]), r["backbone"], r["strategy"]]
        cells += [r["split"], str(r["seeds"])]
        cells += [f"{r[m.clinical]:.3f} {r[f'{m.clinical}_ci']}".strip() for m in HEADLINE]
        cells += [f"{r['val_threshold']:.3f}", f"{r[AT_VAL[0]]:.3f} / {r[AT_VAL[1]]:.3f}"]
        known = "patients" in r and np.isfinite(r.get("patients", np.nan))
        cells.append(f"{r['patients_right']:.1f} / {int(r['patients'])}" if known else "")
        cells += [f"{r.get(name, np.nan):.3f}" for name in PROBES]
        lines.append(table_row(cells))
    return lines


def patients_section(over_seeds: pd.DataFrame, figure_names: list[str]) -> list[str]:
    """Per external set and patient: each setting's mean probability over seeds and how many
    seeds called the patient positive, with the figure of every seed."""
    if over_seeds.empty:
        return []
    lines = [
        "",
        "## External sets per patient",
        "",
        "A patient's score is the mean of their slices' probabilities (label: any positive "
        "slice). Mean ± SD of that score over seeds; *called* counts the seeds whose model calls "
        "the patient positive at its validation-chosen threshold (and at the served one).",
        "",
        *table_head(
            ["data", "patient", "label", "slices", "backbone", "strategy", "split"]
            + ["mean probability ± SD", "called at val threshold", "called at served threshold"]
        ),
    ]
    for _, r in over_seeds.iterrows():
        sd = f" ± {r['sd_probability']:.3f}" if np.isfinite(r["sd_probability"]) else ""
        cells = [r["data"], r["patient_id"], str(r["label"]), str(r["n_slices"]), r["backbone"]]
        cells += [r["strategy"], r["split"], f"{r['mean_probability']:.3f}{sd}"]
        cells += [
            f"{int(r['called_at_val_threshold'])} of {r['seeds']}",
            f"{int(r['called_at_served_threshold'])} of {r['seeds']}",
        ]
        lines.append(table_row(cells))
    lines.append("")
    return lines + [f"![patients of {name}]({name})" for name in figure_names]


def patients_figure(patients: pd.DataFrame, data: str):
    """One external set's patients (positives left): each seed's patient score per strategy,
    filled where that seed's model calls the patient positive at its validation-chosen
    threshold."""
    rows = patients[patients["data"] == data]
    order = rows.sort_values(["label", "patient_id"], ascending=[False, True])
    names = list(dict.fromkeys(order["patient_id"]))
    strategies = sorted(
        rows["strategy"].unique(), key=lambda s: (s not in ("imagenet", "scratch"), s)
    )
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2.5, 4), dpi=110)
    width = 0.7 / max(len(strategies), 1)
    for j, strategy in enumerate(strategies):
        colour = STRATEGY_COLOURS.get(strategy, f"C{j + 2}")
        mine = rows[rows["strategy"] == strategy]
        x = (
            mine["patient_id"].map({n: i for i, n in enumerate(names)})
            + (j - (len(strategies) - 1) / 2) * width
        )
        called = mine["called_at_val_threshold"].astype(bool).to_numpy()
        ax.scatter(
            x[called],
            mine["mean_probability"][called],
            color=colour,
            s=22,
            label=f"{strategy}: called positive",
        )
        ax.scatter(
            x[~called],
            mine["mean_probability"][~called],
            facecolors="none",
            edgecolors=colour,
            s=22,
            label=f"{strategy}: called negative",
        )
    labels = order.drop_duplicates("patient_id")["label"].to_numpy()
    ax.set_xticks(
        range(len(names)),
        [f"{n}\n({'+' if y else '-'})" for n, y in zip(names, labels, strict=True)],
        fontsize=8,
    )
    ax.set(ylabel="patient score (mean slice probability)", ylim=(-0.02, 1.02))
    ax.set_title(f"{data}: each seed's score per patient (label in brackets)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right", ncols=2)
    fig.tight_layout()
    return fig
