"""`mlflow run . -e prepare_transition`: DICOM CT (or 2-D slice folders) -> selected lung slices + manifest."""

from mstl.cli import parse_params
from mstl.dicom.prepare import PrepareParams, run_prepare


def main(argv: list[str] | None = None) -> str:
    run_id = run_prepare(parse_params(PrepareParams, argv))
    print(f"prepare_transition run: {run_id}")
    return run_id


if __name__ == "__main__":
    main()
