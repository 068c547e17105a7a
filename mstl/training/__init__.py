"""Fitting (with the frozen half computed once) and what a fit logs."""

from mstl.training.fit import FitConfig, FitResult, fit_classifier, set_seed

__all__ = ["FitConfig", "FitResult", "fit_classifier", "set_seed"]
