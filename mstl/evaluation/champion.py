"""Choosing the champion among Target runs, one rule for `promote` and the compare report: the
``SELECTION`` metrics on the validation split (highest recall, ties by ROC AUC), and the figures a
registered version is tagged and described with.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from mstl.evaluation.metrics import PAPER, SELECTION

NAN = float("nan")


def selection_key(metrics: Mapping[str, float], split: str) -> tuple[float, ...]:
    """A sort key, best first: each ``SELECTION`` metric on ``split`` (better first; missing
    last)."""
    key = []
    for m in SELECTION:
        value = metrics.get(f"{split}_{m.name}")
        key.append(float("inf") if value is None else (-value if m.greater_is_better else value))
    return tuple(key)


def ranked(runs: pd.DataFrame, n: int = 2, split: str = "val") -> pd.DataFrame:
    """The ``n`` best rows of ``runs`` (one per Target run, with its ``metrics``) by
    ``selection_key``, with the selection metrics as columns (``val_recall``, ``val_roc_auc``)."""
    order = sorted(range(len(runs)), key=lambda i: selection_key(runs["metrics"].iloc[i], split))
    best = runs.iloc[order[:n]]
    return best.assign(
        **{
            f"{split}_{m.name}": [r.get(f"{split}_{m.name}", NAN) for r in best["metrics"]]
            for m in SELECTION
        }
    )


def version_metric_tags(metrics: Mapping[str, float], select_on: str) -> dict[str, str]:
    """The figures a registered version is tagged with: the paper's metrics on the test split and
    the selection metrics on the split it was chosen on (those the run has), to 4 decimals."""
    keys = [f"test_{m.name}" for m in PAPER] + [f"{select_on}_{m.name}" for m in SELECTION]
    return {key: f"{metrics[key]:.4f}" for key in keys if key in metrics}


def description(
    metrics: Mapping[str, float], tags: Mapping[str, str], run_id: str, select_on: str, threshold
) -> str:
    """The registered version's description: where it comes from, why it was chosen, and its test
    figures (recall with its interval)."""
    m = metrics
    return (
        f"{tags.get('backbone')} ({tags.get('strategy')}) on the {tags.get('split')} split, run "
        f"{run_id}. Chosen for the highest {select_on} recall ({m[f'{select_on}_recall']:.3f}). "
        f"Test: recall {m.get('test_recall', NAN):.3f} "
        f"[{m.get('test_recall_ci_low', NAN):.3f}, {m.get('test_recall_ci_high', NAN):.3f}], "
        f"specificity {m.get('test_specificity', NAN):.3f}, "
        f"ROC AUC {m.get('test_roc_auc', NAN):.3f} "
        f"[{m.get('test_roc_auc_ci_low', NAN):.3f}, {m.get('test_roc_auc_ci_high', NAN):.3f}]; "
        f"threshold {threshold}."
    )
