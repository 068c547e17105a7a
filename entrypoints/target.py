"""`mlflow run . -e target`: fine-tune a backbone on COVID-CT and evaluate it (the paper's Target step)."""

from mstl.cli import parse_params
from mstl.training.target import TargetParams, run_target


def main(argv: list[str] | None = None) -> str:
    run_id = run_target(parse_params(TargetParams, argv))
    print(f"target run: {run_id}")
    return run_id


if __name__ == "__main__":
    main()
