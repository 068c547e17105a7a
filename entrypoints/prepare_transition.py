"""`mlflow run . -e prepare_transition`: DICOM CT (or 2-D slice folders) -> selected lung slices +
manifest."""

from mstl.stages.cli import run_stage
from mstl.stages.prepare import PrepareParams, run_prepare

if __name__ == "__main__":
    run_stage(PrepareParams, run_prepare, "prepare_transition")
