"""prepare_transition throughput (read, HU, lung selection, PNG write) and peak memory on one long
series.

- real: the 60-slice Lung-PET-CT-Dx sample in ../shared (512 x 512);
- synthetic: one series of --slices 512 x 512 slices written with pydicom (a phantom with lungs that
  grow and shrink along the series), the size of a thin-slice chest CT.

Each measurement runs in its own process so max RSS is its own. Reports slices/s of the export
(input hashing and header reading included) and peak RSS.

    python benchmarks/bench_prepare.py --slices 500
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(root: str, export_dir: str) -> dict:
    from mstl.stages.prepare import PrepareParams, build_export

    start = time.perf_counter()
    export = build_export(PrepareParams(dicom_root=root, export_dir=export_dir))
    seconds = time.perf_counter() - start
    n = export.summary["n_slices"]
    return {
        "slices": n,
        "kept": export.summary["n_kept"],
        "seconds": seconds,
        "slices_per_s": n / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def write_synthetic(folder: Path, n: int) -> None:
    sys.path.insert(0, str(REPO))
    import numpy as np
    from pydicom.uid import generate_uid

    from tests.dicom_factory import phantom, write_slice

    uid = generate_uid()
    profile = np.sin(np.linspace(0, np.pi, n)) ** 2
    for k in range(n):
        write_slice(
            folder / f"{k:05d}.dcm",
            uid,
            z=0.625 * k,
            instance=k + 1,
            pixels=phantom(512, float(profile[k])),
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shared", default=os.environ.get("MSTL_SHARED", str(REPO.parent / "shared"))
    )
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--measure", help="internal: measure one folder in this process")
    parser.add_argument("--export-dir")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.export_dir)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = Path(tmp) / "synthetic"
        write_synthetic(synthetic, args.slices)
        for name, root in (
            ("real Lung-PET-CT-Dx (2 x 30)", Path(args.shared) / "data" / "lung-pet-ct-dx"),
            (f"synthetic ({args.slices} in one series)", synthetic),
        ):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--measure",
                    str(root),
                    "--export-dir",
                    str(Path(tmp) / "exports" / name[:4]),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append({"input": name, **row})
            print(rows[-1], flush=True)
    print("\n| input | slices | kept | seconds | slices/s | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['input']} | {r['slices']} | {r['kept']} | {r['seconds']:.1f} | "
            f"{r['slices_per_s']:.0f} | {r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
