"""Pictures people would rather look at than read: ROC curves, confusion matrices, montages, and
slice probabilities per patient."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from mstl.evaluation.metrics import Estimate, confusion


def roc_figure(y_true, y_prob, auc: Estimate | None = None, title: str = "ROC") -> plt.Figure:
    fpr, tpr, _ = roc_curve(np.asarray(y_true).astype(int), np.asarray(y_prob, dtype=float))
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    label = "model" if auc is None else f"AUC {auc.value:.3f} [{auc.low:.3f}, {auc.high:.3f}]"
    ax.plot(fpr, tpr, lw=2, label=label)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    ax.set(
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity (recall)",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def confusion_figure(
    y_true, y_prob, threshold: float, class_names=("non-COVID", "COVID"), title: str = ""
) -> plt.Figure:
    counts = confusion(y_true, y_prob, threshold)
    fig, ax = plt.subplots(figsize=(4, 3.6), dpi=120)
    ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(
            j,
            i,
            str(n),
            ha="center",
            va="center",
            color="white" if n > counts.max() / 2 else "black",
            fontsize=14,
        )
    ax.set_xticks([0, 1], [f"pred {c}" for c in class_names])
    ax.set_yticks([0, 1], [f"true {c}" for c in class_names])
    ax.set_title(title or f"threshold {threshold:g}")
    fig.tight_layout()
    return fig


def patient_strip_figure(
    patients, y_true, y_prob, threshold: float, title: str = "per patient"
) -> plt.Figure:
    """Each patient's slice probabilities as a strip (coloured by the patient's label), their mean
    (the patient's score) as a bar, and the threshold: which patients were missed, and whether by
    a few slices or by all of them."""
    slices = pd.DataFrame(
        {
            "patient": np.asarray(patients).astype(str),
            "y": np.asarray(y_true).astype(int),
            "p": np.asarray(y_prob, dtype=float),
        }
    )
    label = slices.groupby("patient")["y"].max()
    order = sorted(label.index, key=lambda name: (-label[name], name))  # positives first
    fig, ax = plt.subplots(figsize=(min(2 + 0.6 * len(order), 16), 4), dpi=120)
    jitter = np.random.default_rng(0)
    for x, name in enumerate(order):
        p = slices.loc[slices["patient"] == name, "p"].to_numpy()
        colour = "tab:red" if label[name] else "tab:blue"
        ax.scatter(x + jitter.uniform(-0.25, 0.25, len(p)), p, s=6, alpha=0.5, color=colour)
        ax.plot([x - 0.35, x + 0.35], [p.mean()] * 2, color="black", lw=2)
    ax.axhline(threshold, ls="--", color="grey", lw=1)
    ax.set_xticks(range(len(order)), order, rotation=90 if len(order) > 12 else 0, fontsize=8)
    ax.set(
        ylim=(-0.02, 1.02),
        ylabel="probability of COVID per slice",
        xlabel=f"patient (red: COVID, blue: not; bar: mean; dashed: threshold {threshold:g})",
    )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
