"""The `compare` stage: the paper's Table III and Figures 5-7 from the Target runs on a tracking
server, with confidence intervals, paired tests against the ImageNet baseline, and an operating
point chosen on validation data (``mstl.evaluation.report``). Written as Markdown + PNG + CSV and
logged as the compare run's artifacts.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import pandas as pd

from mstl import defaults
from mstl.evaluation.report import (
    RESULTS_SECTION,
    provenance,
    section_markers,
    write_report,
    write_results_doc,
)
from mstl.tracking import (
    log_params,
    log_ui_table,
    share_comparison_view,
    start_stage_run,
    tracking_uri,
)
from mstl.tracking.runs import collect, collect_external


@dataclass(frozen=True)
class CompareParams:
    """Parameters of `-e compare`."""

    search_experiment: str = defaults.EXPERIMENT_NAME
    parent_run: str = ""  # only Target runs under this run (e.g. one experiment grid), at any depth
    target_recall: float = 0.95
    out_dir: str = "exports/report"
    # a Markdown file (e.g. docs/results.md) whose results section is regenerated
    results_doc: str = ""
    # the section of results_doc to regenerate (its markers <!-- mstl:NAME:start/end -->): several
    # grids can each keep their own generated section in one document
    results_section: str = RESULTS_SECTION
    experiment: str = defaults.EXPERIMENT_NAME

    def validate(self) -> None:
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        section_markers(self.results_section)


def run_compare(params: CompareParams) -> str:
    """Read the Target runs (and their evaluate runs) back, write the report into ``out_dir`` (and
    ``results_doc``), and log it as the compare run's artifacts; returns the run ID."""
    params.validate()
    client = mlflow.MlflowClient(tracking_uri())
    with tempfile.TemporaryDirectory() as tmp, start_stage_run(params.experiment, "compare") as run:
        mlflow.set_tag("stage", "compare")
        log_params({k: v for k, v in asdict(params).items() if k != "experiment"})
        runs = collect(client, params.search_experiment, Path(tmp), params.parent_run)
        external = collect_external(client, runs, Path(tmp))
        out = Path(params.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        about = provenance(
            run.info.run_id, len(runs), params.search_experiment, params.parent_run, tracking_uri()
        )
        counts = write_report(runs, external, params.target_recall, out, about)
        if params.results_doc:
            write_results_doc(out, Path(params.results_doc), params.results_section)
            print(
                f"compare: section {params.results_section!r} of {params.results_doc} regenerated"
            )
        mlflow.log_artifacts(str(out), "report")
        log_report_tables(out)
        mlflow.log_metrics(counts)
        view = share_comparison_view(
            client.get_experiment_by_name(params.search_experiment).experiment_id
        )
        mlflow.set_tag("mstl.ui_view", view)
        # both experiments by name: the one this run is logged in is easily taken for the searched
        # one
        logged_in = client.get_experiment(run.info.experiment_id).name
        scope = f", grid run {params.parent_run}" if params.parent_run else ""
        print(
            f"compare: {len(runs)} Target runs of experiment {params.search_experiment!r}{scope}; "
            f"report in {out / 'report.md'}; this compare run is in experiment {logged_in!r}"
        )
        print(f"compare: the Target runs grouped by strategy in the MLflow UI: {view}")
        return run.info.run_id


# the report's tables that the run page shows as tables (the CSVs stay beside them for reading back)
UI_TABLES = ("table_iii", "paired_tests", "external")


def log_report_tables(out: Path) -> None:
    """Log the report's tables again through ``mlflow.log_table``, as ``report/<name>.json``."""
    for name in UI_TABLES:
        path = out / f"{name}.csv"
        # a table without rows (no paired test on an ImageNet-only grid) is written as a bare "\n"
        if path.exists() and path.read_text().strip():
            log_ui_table(pd.read_csv(path), f"report/{name}.json")
