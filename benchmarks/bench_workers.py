"""How many grid workers, with how many TensorFlow threads each, get the most training out of this
machine.

Each worker is one process doing what a Target epoch does (``bench_pipeline.py``'s default variant:
the official split's 425 training and 118 validation images at 224 px, MobileNet-0.25 with the
frozen half computed once), started together with the others. Throughput is the sum over workers of
training images per second in the later epochs; every configuration is measured ``--repeats`` times,
interleaved, so a noisy neighbour hits them alike, and reported as the median ratio against one
worker with TensorFlow's default threads (what one `mlflow run -e experiment` does).

    python benchmarks/bench_workers.py --data-root ../shared/data --epochs 10 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PIPELINE = Path(__file__).with_name("bench_pipeline.py")
CONFIGS = (
    (1, 0),
    (1, 1),
    (2, 1),
    (2, 0),
)  # (workers, TensorFlow threads per worker; 0 = its default)


def measure(workers: int, threads: int, data_root: str, epochs: int) -> list[dict]:
    cmd = [
        sys.executable,
        str(PIPELINE),
        "--variant",
        "decode_once_cache_frozen_features",
        "--data-root",
        data_root,
    ]
    cmd += ["--epochs", str(epochs), "--threads", str(threads)]
    running = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(workers)
    ]
    rows = []
    for process in running:
        out, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {process.returncode}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", default=os.environ.get("MSTL_SHARED", "../shared") + "/data")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench-out/workers.jsonl")
    args = parser.parse_args()
    throughput: dict[tuple[int, int], list[float]] = {config: [] for config in CONFIGS}
    epoch_seconds: dict[tuple[int, int], list[float]] = {config: [] for config in CONFIGS}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for repeat in range(args.repeats):
            for workers, threads in CONFIGS:
                rows = measure(workers, threads, args.data_root, args.epochs)
                total = sum(r["later_images_per_s"] for r in rows)
                throughput[(workers, threads)].append(total)
                epoch_seconds[(workers, threads)] += [r["later_epoch_s"] for r in rows]
                f.write(
                    json.dumps(
                        {
                            "repeat": repeat,
                            "workers": workers,
                            "threads": threads,
                            "images_per_s": total,
                            "rows": rows,
                        }
                    )
                    + "\n"
                )
                print(
                    f"repeat {repeat}: {workers} worker(s) x {threads or 'default'} thread(s): "
                    f"{total:.0f} images/s",
                    flush=True,
                )
    base = statistics.median(throughput[CONFIGS[0]])
    print(
        "\n| workers | TensorFlow threads each | epoch s per worker (median) | training images/s, "
        "all workers (median) | ratio |"
    )
    print("| --- | --- | --- | --- | --- |")
    for workers, threads in CONFIGS:
        total = statistics.median(throughput[(workers, threads)])
        seconds = statistics.median(epoch_seconds[(workers, threads)])
        print(
            f"| {workers} | {threads or 'default'} | {seconds:.2f} | {total:.0f} | "
            f"{total / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
