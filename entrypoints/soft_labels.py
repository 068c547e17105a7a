"""`mlflow run . -e soft_labels`: features, an Optuna search for k with nested trial runs, and the
labels CSV."""

from mstl.stages.cli import run_stage
from mstl.stages.soft_labels import SoftLabelParams, run_soft_labels

if __name__ == "__main__":
    run_stage(SoftLabelParams, run_soft_labels, "soft_labels")
