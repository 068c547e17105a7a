"""Peak memory of the project's fit at the paper's data size: N synthetic uint8 grey slices (default
10,176, the paper's Transition set, split 90/10 into train and validation) at 224 px, a backbone
with random weights (memory does not depend on them), the real ``fit_classifier`` with the frozen
half computed once, trained for a bounded number of steps.

    python benchmarks/bench_memory.py --backbones resnet50v2,densenet121 --n 10176 --steps 3
    python benchmarks/bench_memory.py --backbones mobilenet_025 --n 200 --steps 2   # smoke check

Each backbone runs in its own process; a thread samples its RSS (and its anonymous part, RSS minus
file-backed and shared pages: what memory-mapped features do not add to) every 0.1 s, split at the
frozen phase (frozen half's forward over every slice, writing or reading the features) and the
training phase (the epochs). ``--memory-budget-gib`` overrides ``FitConfig.frozen_memory_bytes``
(0: always memory-mapped); ``--pythonpath`` runs another copy of the package (e.g. the code before
a change). Prints a Markdown table for docs/benchmarks.md and one JSON line per backbone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

BACKBONES = "resnet50v2,resnet101v2,densenet121,densenet169"


class RssSampler(threading.Thread):
    """Samples this process's RSS and anonymous RSS (MiB) with timestamps until stopped."""

    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        import psutil

        self.process, self.every, self.samples = psutil.Process(), every, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            info = self.process.memory_info()
            self.samples.append((time.perf_counter(), info.rss, info.rss - info.shared))
            self.done.wait(self.every)

    def peaks(self, start: float, end: float) -> tuple[float, float]:
        """Peak RSS and peak anonymous RSS (MiB) between two ``perf_counter`` times."""
        window = [s for s in self.samples if start <= s[0] <= end] or self.samples[-1:]
        return max(s[1] for s in window) / 2**20, max(s[2] for s in window) / 2**20


def fit_config(args: argparse.Namespace):
    from mstl.training.fit import FitConfig

    extra = {}
    if args.memory_budget_gib is not None:  # the code before the change has no such field
        extra["frozen_memory_bytes"] = int(args.memory_budget_gib * 1024**3)
    return FitConfig(
        epochs=args.epochs,
        batch_size=args.batch,
        log_to_mlflow=False,
        steps_per_epoch=args.steps,
        **extra,
    )


def measure(backbone: str, args: argparse.Namespace) -> dict:
    """One backbone in this process: synthesise, build, fit; wall time and peak RSS per phase."""
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()  # imports (TensorFlow) count as data time
    import numpy as np

    from mstl.array_cache import ArrayCache
    from mstl.models import TARGET_OUTPUT, build_classifier, get_backbone
    from mstl.training.fit import fit_classifier, set_seed

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (args.n, args.image_size, args.image_size), dtype=np.uint8)
    y = (np.arange(args.n) % 2).astype("float32")
    n_val = max(1, round(args.n * args.val_fraction))
    train, val = (grey[n_val:], y[n_val:]), (grey[:n_val], y[:n_val])
    t_data = time.perf_counter()
    set_seed(0)
    model = build_classifier(backbone, "none", args.image_size, TARGET_OUTPUT)
    t_model = time.perf_counter()
    cache = ArrayCache(args.cache_dir) if args.cache_dir else None
    result = fit_classifier(
        model, train, val, get_backbone(backbone).preprocess_input, TARGET_OUTPUT,
        fit_config(args), cache,
    )  # fmt: skip
    t_end = time.perf_counter()
    sampler.done.set()
    sampler.join()
    train_s = sum(result.epoch_seconds)
    split = t_end - train_s  # frozen phase (with the split and compile) before, epochs after
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cut = model.get_layer(result.cut_layer) if result.cut_layer else None
    feature_bytes = 4 * int(np.prod(cut.output.shape[1:])) * args.n if cut is not None else 0
    return {
        "backbone": backbone,
        "n": args.n,
        "cut_layer": result.cut_layer,
        "feature_gib": feature_bytes / 1024**3,
        "storage": getattr(result, "frozen_storage", "memory" if result.cached_frozen else "none"),
        "frozen_cache": result.frozen_cache,
        "data_s": t_data - t0,
        "build_s": t_model - t_data,
        "frozen_s": result.frozen_seconds,
        "train_s": train_s,
        "epoch_s": result.epoch_seconds,
        "steps": args.steps,
        "total_s": t_end - t0,
        "peak_frozen_mib": sampler.peaks(t_model, split),
        "peak_train_mib": sampler.peaks(split, t_end),
        "maxrss_mib": usage.ru_maxrss / 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def row(r: dict) -> str:
    """One Markdown row: sizes, path, phase times and peaks."""
    frozen_rss, frozen_anon = r["peak_frozen_mib"]
    train_rss, train_anon = r["peak_train_mib"]
    return (
        f"| {r['backbone']} | {r['n']} | {r['feature_gib']:.2f} | {r['storage']} | "
        f"{r['data_s'] + r['build_s']:.0f} | {r['frozen_s']:.0f} | {r['train_s']:.0f} | "
        f"{frozen_rss:.0f} / {frozen_anon:.0f} | {train_rss:.0f} / {train_anon:.0f} | "
        f"{r['maxrss_mib']:.0f} | {r['cpu_s']:.0f} |"
    )


def child_argv(backbone: str, args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, __file__, "--one", backbone, "--n", str(args.n),
            "--val-fraction", str(args.val_fraction), "--steps", str(args.steps),
            "--epochs", str(args.epochs), "--batch", str(args.batch),
            "--image-size", str(args.image_size)]  # fmt: skip
    if args.memory_budget_gib is not None:
        argv += ["--memory-budget-gib", str(args.memory_budget_gib)]
    if args.cache_dir:
        argv += ["--cache-dir", args.cache_dir]
    return argv


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbones", default=BACKBONES)
    parser.add_argument("--n", type=int, default=10176, help="slices, train and validation")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3, help="batches per epoch (0: all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--memory-budget-gib", type=float, default=None)
    parser.add_argument("--cache-dir", default=None, help="an ArrayCache folder (default: none)")
    parser.add_argument("--pythonpath", default=None, help="import mstl from this folder")
    parser.add_argument("--one", help="internal: the backbone to measure in this process")
    return parser.parse_args()


def main() -> None:
    args = parse()
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, args)), flush=True)
        return
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.pythonpath, env.get("PYTHONPATH")]))
    print(
        "| backbone | slices | features (GiB) | features in | import, data, build (s) | "
        "frozen phase (s) | training (s) | peak RSS / anon, frozen phase (MiB) | "
        "peak RSS / anon, training (MiB) | "
        "max RSS (MiB) | CPU (s) |\n|" + " --- |" * 11,
        flush=True,
    )
    for backbone in args.backbones.split(","):
        done = subprocess.run(child_argv(backbone, args), capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"| {backbone} | failed (exit {done.returncode}): {done.stderr[-400:]!r} |")
            continue
        result = json.loads(lines[0][7:])
        print(row(result), flush=True)
        print("JSON " + json.dumps(result), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
