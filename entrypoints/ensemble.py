"""`mlflow run . -e ensemble`: several Target runs served as one pyfunc averaging their
probabilities."""

from mstl.stages.cli import run_stage
from mstl.stages.ensemble import EnsembleParams, run_ensemble

if __name__ == "__main__":
    run_stage(EnsembleParams, run_ensemble, "ensemble")
