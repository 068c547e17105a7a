"""Where an experiment grid's time went, read back from its runs: per stage (cells that ran, reused
ones left out), and for the Transition and Target cells the decode and frozen-feature time with the
shared on-disk cache missing against hitting, so what each saving bought is measured on the grid
itself.

    python benchmarks/grid_time.py --experiment cpu-profile [--tracking-uri sqlite:///mlflow.db]

Writes a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import tempfile

import mlflow
import numpy as np
import pandas as pd


def grids(client, experiment: str) -> dict[str, list]:
    """The finished worker runs of each grid (one Optuna study, ``mstl.grid`` tag), first started
    first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r}")
    runs = client.search_runs(
        [exp.experiment_id], "tags.stage = 'experiment' and attributes.status = 'FINISHED'"
    )
    by_grid: dict[str, list] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        by_grid.setdefault(run.data.tags.get("mstl.grid", run.info.run_id), []).append(run)
    return by_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment", default="cpu-profile")
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args()
    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    client = mlflow.MlflowClient()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, workers in grids(client, args.experiment).items():
            # every worker ends knowing every cell: one worker's list is the grid's
            cells = pd.read_csv(
                client.download_artifacts(workers[0].info.run_id, "grid/cells.csv", tmp)
            )
            wall = (
                max(w.info.end_time for w in workers) - min(w.info.start_time for w in workers)
            ) / 1000
            ran = cells[~cells["reused"]]
            busy = ran["seconds"].sum() / (wall * len(workers))
            print(
                f"grid {name} (split {workers[0].data.params.get('split')}, {len(workers)} "
                "worker(s), threads "
                f"{workers[0].data.params.get('threads', 'default')}): {wall:.0f} s wall, "
                f"{len(ran)} cells run, "
                f"{int(cells['reused'].sum())} reused; the workers spent {busy:.0%} of the wall "
                "time in cells"
            )
            for _, cell in ran.iterrows():
                run = client.get_run(cell["run_id"])
                rows.append(
                    {
                        "grid": name,
                        "stage": cell["stage"],
                        "seconds": cell["seconds"],
                        "decode_seconds": run.data.metrics.get("decode_seconds", np.nan),
                        "frozen_seconds": run.data.metrics.get("frozen_seconds", np.nan),
                        "fit_seconds": run.data.metrics.get("fit_seconds", np.nan),
                        "epochs_run": run.data.metrics.get(
                            "epochs_run", np.nan
                        ),  # logged since patience
                        "decoded_cache": run.data.params.get("decoded_cache", ""),
                        "frozen_cache": run.data.params.get("frozen_cache", ""),
                    }
                )
    table = pd.DataFrame(rows)
    print(
        "\n| stage | cells run | total s | mean s per cell | of it fitting (mean s) | epochs run "
        "(mean) |"
        "\n| --- | --- | --- | --- | --- | --- |"
    )
    for stage, group in table.groupby("stage", sort=False):
        fit, epochs = (group[column].mean() for column in ("fit_seconds", "epochs_run"))
        fit_text, epochs_text = (
            f"{mean:.1f}" if np.isfinite(mean) else "" for mean in (fit, epochs)
        )
        print(
            f"| {stage} | {len(group)} | {group['seconds'].sum():.0f} | "
            f"{group['seconds'].mean():.1f} | {fit_text} "
            f"| {epochs_text} |"
        )
    print(f"| all | {len(table)} | {table['seconds'].sum():.0f} | | | |")
    print(
        "\n| stage | part | cache | cells | mean s | saved in this grid (s) |\n| --- | --- | --- | "
        "--- | --- | --- |"
    )
    for stage in ("transition", "target"):
        for part, column in (("decode", "decoded_cache"), ("frozen", "frozen_cache")):
            group = table[table["stage"] == stage]
            seconds = f"{part}_seconds"
            miss = group.loc[group[column] == "miss", seconds]
            hit = group.loc[group[column] == "hit", seconds]
            for outcome, values in (("miss", miss), ("hit", hit)):
                if len(values):
                    saved = (
                        (miss.mean() - hit.mean()) * len(hit)
                        if outcome == "hit" and len(miss)
                        else np.nan
                    )
                    saved_text = f"{saved:.0f}" if np.isfinite(saved) else ""
                    print(
                        f"| {stage} | {part} | {outcome} | {len(values)} | {values.mean():.2f} | "
                        f"{saved_text} |"
                    )


if __name__ == "__main__":
    main()
