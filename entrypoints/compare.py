"""`mlflow run . -e compare`: Table III, Figures 5-7 and paired tests from the Target runs on the
server."""

from mstl.stages.cli import run_stage
from mstl.stages.compare import CompareParams, run_compare

if __name__ == "__main__":
    run_stage(CompareParams, run_compare, "compare")
