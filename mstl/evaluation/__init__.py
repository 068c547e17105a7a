"""Metrics with bootstrap confidence intervals, and the ROC / confusion-matrix pictures."""

from mstl.evaluation.metrics import (
    METRIC_NAMES,
    Estimate,
    bootstrap_metrics,
    confusion,
    point_metrics,
)
from mstl.evaluation.plots import confusion_figure, roc_figure

__all__ = [
    "METRIC_NAMES",
    "Estimate",
    "bootstrap_metrics",
    "confusion",
    "confusion_figure",
    "point_metrics",
    "roc_figure",
]
