"""`mlflow run . -e explain`: Grad-CAM overlays for any image or DICOM slice and any logged or
registered model."""

from mstl.stages.cli import run_stage
from mstl.stages.explain import ExplainParams, run_explain

if __name__ == "__main__":
    run_stage(ExplainParams, run_explain, "explain")
