"""`mlflow run . -e soft_labels`: features, an Optuna search for k with nested trial runs, and the labels CSV."""

from mstl.cli import run_stage
from mstl.soft_labels.stage import SoftLabelParams, run_soft_labels

if __name__ == "__main__":
    run_stage(SoftLabelParams, run_soft_labels, "soft_labels")
