"""`mlflow run . -e transition`: fine-tune a backbone on Transition slices (hard or soft labels)."""

from mstl.cli import parse_params
from mstl.training.transition import TransitionParams, run_transition


def main(argv: list[str] | None = None) -> str:
    run_id = run_transition(parse_params(TransitionParams, argv))
    print(f"transition run: {run_id}")
    return run_id


if __name__ == "__main__":
    main()
