"""Fitting (with the frozen half computed once) and the Target stage."""

from mstl.training.fit import FitConfig, FitResult, fit_classifier, image_dataset, set_seed
from mstl.training.target import TargetParams, run_target

__all__ = ["FitConfig", "FitResult", "TargetParams", "fit_classifier", "image_dataset", "run_target", "set_seed"]
