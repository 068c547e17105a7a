"""Peak memory and wall time of one grid worker (`-e experiment`), its cells' processes included.

Runs ``python -m entrypoints.experiment`` from a checkout (``--repo``, default this one) at tiny
settings in a fresh folder: its own sqlite tracking store, Optuna storage, caches and Keras cache
(MobileNet-0.25's ImageNet file copied in from ``--weights``). psutil samples the resident memory of
the worker and of every process under it ``--hz`` times a second: the peak of the resident sizes
summed (each process counts the shared libraries it maps), of the proportional sizes summed (shared
pages split between processes: what the machine held), and of the largest single process, overall
and per cell; with the wall time and the CPU seconds of the whole tree.

To compare the in-process grid (before cells ran in processes of their own) with this one, run the
old code from a clean clone, never from a stash:

    git clone -q . /tmp/before && git -C /tmp/before checkout -q <commit>
    python benchmarks/bench_cell_processes.py --repo /tmp/before --out bench-out/cells-before.json
    python benchmarks/bench_cell_processes.py --out bench-out/cells-after.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MSTL_SHARED") or REPO.parent / "shared")
# 7 cells: prepare, soft labels, hard and soft Transitions, imagenet, hard and soft Targets
TINY = {
    "profile": "cpu",
    "strategies": "imagenet,hard,soft",
    "seeds": "0",
    "epochs": 1,
    "image_size": 64,
    "soft_k_values": "2,4",
    "soft_folds": 2,
}


def tree_memory(root: psutil.Process) -> dict[str, int]:
    """Memory of ``root`` and all its descendants now: resident bytes summed (``rss``; pages of
    shared libraries count once per process), proportional set size summed (``pss``: shared pages
    split between the processes that map them, so the sum is what the machine holds), the largest
    single process's resident bytes, and how many processes there are."""
    rss, pss = [], []
    for process in [root, *root.children(recursive=True)]:
        try:
            info = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss.append(info.rss)
        pss.append(info.pss)
    return {"rss": sum(rss), "pss": sum(pss), "largest": max(rss, default=0), "count": len(rss)}


def sample(process: subprocess.Popen, hz: float, samples: list) -> None:
    """Sample the process tree until it exits, appending (seconds, memory) to ``samples``."""
    root = psutil.Process(process.pid)
    start = time.perf_counter()
    while process.poll() is None:
        try:
            samples.append((time.perf_counter() - start, tree_memory(root)))
        except psutil.NoSuchProcess:
            break
        time.sleep(1 / hz)


def peaks(samples: list, start: float = 0.0, end: float = float("inf")) -> dict:
    """The peaks of the samples taken between ``start`` and ``end`` seconds, in MiB."""
    window = [m for t, m in samples if start <= t < end] or [
        {"rss": 0, "pss": 0, "largest": 0, "count": 0}
    ]
    return {
        "peak_tree_rss_mb": round(max(m["rss"] for m in window) / 2**20),
        "peak_tree_pss_mb": round(max(m["pss"] for m in window) / 2**20),
        "peak_largest_process_rss_mb": round(max(m["largest"] for m in window) / 2**20),
        "most_processes": max(m["count"] for m in window),
        # the least the tree held: in-process, what the worker kept from the cells before
        "floor_tree_rss_mb": round(min(m["rss"] for m in window) / 2**20),
    }


def grid_command(repo: Path, work: Path, data_root: str, extra: dict) -> list[str]:
    params = {
        **TINY,
        "data_root": data_root,
        "export_dir": work / "exports",
        "cache_dir": work / "cache",
        **extra,
    }
    cmd = [sys.executable, "-m", "entrypoints.experiment"]
    for key, value in params.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def environment(repo: Path, work: Path) -> dict[str, str]:
    """The benchmark's own tracking store and Keras cache; ``repo``'s code first on the path."""
    env = dict(
        os.environ,
        PYTHONPATH=str(repo),
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
        KERAS_HOME=str(work / "keras"),
        PYTHONUNBUFFERED="1",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    for leaked in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(leaked, None)
    return env


def prefetch_weights(repo: Path, env: dict, weights: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "mstl.models", "prefetch", "mobilenet_025"]
        + ["--base-url", weights.resolve().as_uri()],
        cwd=repo,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def run_grid(args: argparse.Namespace, work: Path) -> dict:
    """One grid worker in ``work``, sampled; its numbers as a dict."""
    repo = Path(args.repo).resolve()
    env = environment(repo, work)
    if args.weights:
        prefetch_weights(repo, env, Path(args.weights))
    cmd = grid_command(repo, work, args.data_root, dict(kv.split("=", 1) for kv in args.param))
    samples: list = []
    started: list[tuple[float, str]] = []  # (seconds, cell) as each cell starts
    cpu_before = children_cpu_seconds()
    start = time.perf_counter()
    process = subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    sampler = threading.Thread(target=sample, args=(process, args.hz, samples), daemon=True)
    sampler.start()
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line)
        if match := RUNNING.search(line):
            started.append((time.perf_counter() - start, match["cell"]))
        if args.verbose:
            print(line, end="", flush=True)
    process.wait()
    wall = time.perf_counter() - start
    sampler.join()
    if process.returncode:
        sys.stdout.writelines(lines[-60:])
        raise SystemExit(f"the grid failed with exit code {process.returncode}")
    summary = next((m for m in map(CELLS.search, lines) if m), None)
    ends = [t for t, _ in started[1:]] + [wall]
    return {
        "repo": str(repo),
        "commit": commit_of(repo),
        "cells": int(summary["cells"]) if summary else None,
        "cells_run": int(summary["run"]) if summary else None,
        "wall_s": round(wall, 1),
        "cpu_s": round(children_cpu_seconds() - cpu_before, 1),
        **peaks(samples),
        "per_cell": [
            {"cell": cell, "seconds": round(end - t, 1), **peaks(samples, t, end)}
            for (t, cell), end in zip(started, ends, strict=True)
        ],
        "command": " ".join(cmd[1:]),
    }


def children_cpu_seconds() -> float:
    """User and system CPU seconds of this process's finished children (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


RUNNING = re.compile(r"\[\d+/\d+\] (?P<cell>\S+): running")
CELLS = re.compile(r"experiment: (?P<cells>\d+) cells, this worker ran (?P<run>\d+)")


def commit_of(repo: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", default=str(REPO), help="the checkout whose grid is measured")
    parser.add_argument("--data-root", default=str(SHARED / "data"))
    parser.add_argument("--weights", default=str(SHARED / "weights"), help="'' to skip")
    parser.add_argument("--param", action="append", default=[], help="KEY=VALUE, over TINY")
    parser.add_argument("--hz", type=float, default=4.0)
    parser.add_argument("--out", default="", help="also write the numbers to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--verbose", action="store_true", help="echo the grid's output")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mstl-bench-cells-"))
    result = run_grid(args, work) | {"work": str(work) if args.keep else ""}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
