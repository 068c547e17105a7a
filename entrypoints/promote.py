"""`mlflow run . -e promote`: register the most sensitive Target model (chosen on validation) as
champion."""

from mstl.stages.cli import run_stage
from mstl.stages.promote import PromoteParams, run_promote

if __name__ == "__main__":
    run_stage(PromoteParams, run_promote, "promote")
