"""Where an experiment grid's time went, read back from its runs: per stage (cells that ran, reused ones
left out), and for the Transition and Target cells the decode and frozen-feature time with the shared
on-disk cache missing against hitting, so what each saving bought is measured on the grid itself.

    python benchmarks/grid_time.py --experiment cpu-profile [--tracking-uri sqlite:///mlflow.db]

Writes a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import tempfile

import mlflow
import numpy as np
import pandas as pd


def grid_runs(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r}")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'experiment' and attributes.status = 'FINISHED'")
    return sorted(runs, key=lambda r: r.info.start_time)


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
        for grid in grid_runs(client, args.experiment):
            cells = pd.read_csv(client.download_artifacts(grid.info.run_id, "grid/cells.csv", tmp))
            wall = (grid.info.end_time - grid.info.start_time) / 1000
            print(
                f"grid {grid.info.run_id[:8]} (split {grid.data.params.get('split')}): {wall:.0f} s wall, "
                f"{int((~cells['reused']).sum())} cells run, {int(cells['reused'].sum())} reused"
            )
            for _, cell in cells[~cells["reused"]].iterrows():
                run = client.get_run(cell["run_id"])
                rows.append(
                    {
                        "grid": grid.info.run_id[:8],
                        "stage": cell["stage"],
                        "seconds": cell["seconds"],
                        "decode_seconds": run.data.metrics.get("decode_seconds", np.nan),
                        "frozen_seconds": run.data.metrics.get("frozen_seconds", np.nan),
                        "fit_seconds": run.data.metrics.get("fit_seconds", np.nan),
                        "decoded_cache": run.data.params.get("decoded_cache", ""),
                        "frozen_cache": run.data.params.get("frozen_cache", ""),
                    }
                )
    table = pd.DataFrame(rows)
    print("\n| stage | cells run | total s | mean s per cell |\n| --- | --- | --- | --- |")
    for stage, group in table.groupby("stage", sort=False):
        print(f"| {stage} | {len(group)} | {group['seconds'].sum():.0f} | {group['seconds'].mean():.1f} |")
    print(f"| all | {len(table)} | {table['seconds'].sum():.0f} | |")
    print("\n| stage | part | cache | cells | mean s | saved in this grid (s) |\n| --- | --- | --- | --- | --- | --- |")
    for stage in ("transition", "target"):
        for part, column in (("decode", "decoded_cache"), ("frozen", "frozen_cache")):
            group = table[table["stage"] == stage]
            seconds = f"{part}_seconds"
            miss = group.loc[group[column] == "miss", seconds]
            hit = group.loc[group[column] == "hit", seconds]
            for outcome, values in (("miss", miss), ("hit", hit)):
                if len(values):
                    saved = (miss.mean() - hit.mean()) * len(hit) if outcome == "hit" and len(miss) else np.nan
                    saved_text = f"{saved:.0f}" if np.isfinite(saved) else ""
                    print(f"| {stage} | {part} | {outcome} | {len(values)} | {values.mean():.2f} | {saved_text} |")


if __name__ == "__main__":
    main()
