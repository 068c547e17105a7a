"""`mlflow run . -e experiment`: the paper's grid (backbones x {imagenet, hard, soft} x seeds),
finished work reused."""

from mstl.stages.cli import run_stage
from mstl.stages.experiment import ExperimentParams, run_experiment

if __name__ == "__main__":
    run_stage(ExperimentParams, run_experiment, "experiment")
