"""`mlflow run . -e evaluate`: score a logged or registered model on any labelled CT image set and
track it."""

from mstl.stages.cli import run_stage
from mstl.stages.evaluate import EvaluateParams, run_evaluate

if __name__ == "__main__":
    run_stage(EvaluateParams, run_evaluate, "evaluate")
