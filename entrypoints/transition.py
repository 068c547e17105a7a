"""`mlflow run . -e transition`: fine-tune a backbone on Transition slices (hard or soft labels)."""

from mstl.stages.cli import run_stage
from mstl.stages.transition import TransitionParams, run_transition

if __name__ == "__main__":
    run_stage(TransitionParams, run_transition, "transition")
