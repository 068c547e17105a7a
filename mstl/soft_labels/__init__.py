"""Soft labels for the Transition task: CNN features, KMeans, and an Optuna search over k."""

from mstl.soft_labels.search import (
    CRITERIA,
    check_counts,
    check_features,
    fold_scores,
    parse_k_range,
    parse_k_values,
)

__all__ = [
    "CRITERIA",
    "check_counts",
    "check_features",
    "fold_scores",
    "parse_k_range",
    "parse_k_values",
]
