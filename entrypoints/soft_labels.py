"""`mlflow run . -e soft_labels`: features, an Optuna search for k with nested trial runs, and the labels CSV."""

from mstl.cli import parse_params
from mstl.soft_labels.stage import SoftLabelParams, run_soft_labels


def main(argv: list[str] | None = None) -> str:
    run_id = run_soft_labels(parse_params(SoftLabelParams, argv))
    print(f"soft_labels run: {run_id}")
    return run_id


if __name__ == "__main__":
    main()
