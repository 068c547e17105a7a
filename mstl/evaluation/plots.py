"""Pictures people would rather look at than read: ROC curves, confusion matrices, montages."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
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
