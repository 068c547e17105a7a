"""`mlflow run . -e target`: fine-tune a backbone on COVID-CT and evaluate it (the paper's Target
step)."""

from mstl.stages.cli import run_stage
from mstl.stages.target import TargetParams, run_target

if __name__ == "__main__":
    run_stage(TargetParams, run_target, "target")
