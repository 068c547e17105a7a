"""The criterion-vs-k curves and the effect of dimension reduction, on real features.

Features: MobileNet-0.25 (ImageNet) conv base at 224 px, flattened (7 x 7 x 256 = 12,544 values), of
the 1,055 distinct IQ-OTH/NCCD slices in ../shared, after prepare_transition's grey conversion. For
each criterion, the held-out score of 10-fold CV for k in {2, 4, 8, 16}; then, at the k silhouette
chooses, the adjusted Rand index between the final KMeans labels with and without PCA / random
projection.

    python benchmarks/soft_labels_real.py --out docs/img/criterion-vs-k-real.png
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shared", default=os.environ.get("MSTL_SHARED", str(REPO.parent / "shared"))
    )
    parser.add_argument("--out", default="docs/img/criterion-vs-k-real.png")
    parser.add_argument("--folds", type=int, default=10)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from mstl.soft_labels.clusters import reduce_features
    from mstl.soft_labels.features import cached_features
    from mstl.soft_labels.search import CRITERIA, fold_scores
    from mstl.stages.prepare import PrepareParams, build_export

    with tempfile.TemporaryDirectory() as tmp:
        export = build_export(
            PrepareParams(
                slices_root=str(Path(args.shared) / "data" / "iq-oth-nccd"),
                export_dir=str(Path(tmp) / "exports"),
            )
        )
        files = [export.folder / f for f in export.manifest["file"]]
        features, _, _ = cached_features(
            files, "mobilenet_025", "imagenet", 224, Path(tmp) / "features"
        )
        features = np.asarray(features)
    ks = [2, 4, 8, 16]
    curves = {}
    for criterion in CRITERIA:
        curves[criterion] = [
            float(np.nanmean(fold_scores(features, k, criterion, args.folds, 0))) for k in ks
        ]
        print(
            json.dumps({"criterion": criterion, "k": ks, "mean_held_out_score": curves[criterion]}),
            flush=True,
        )
    chosen = ks[int(np.argmax(curves["silhouette"]))]
    base = KMeans(n_clusters=chosen, n_init=10, random_state=0).fit_predict(features)
    for method, dim in (("pca", 256), ("pca", 64), ("random", 1024), ("random", 256)):
        reduced = reduce_features(features, method, dim, 0)
        labels = KMeans(n_clusters=chosen, n_init=10, random_state=0).fit_predict(reduced)
        print(
            json.dumps(
                {
                    "reduce": method,
                    "dim": dim,
                    "k": chosen,
                    "ari_vs_none": adjusted_rand_score(base, labels),
                }
            ),
            flush=True,
        )

    fig, axes = plt.subplots(1, len(CRITERIA), figsize=(3.2 * len(CRITERIA), 3), dpi=110)
    for ax, criterion in zip(axes, CRITERIA, strict=False):
        ax.plot(ks, curves[criterion], marker="o")
        best = ks[int(np.argmax(curves[criterion]))]
        ax.axvline(best, color="tab:red", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(f"{criterion}\n(chooses k={best})", fontsize=9)
        ax.set_xlabel("k")
    axes[0].set_ylabel(f"held-out score, {args.folds}-fold mean\n(higher is better)")
    fig.suptitle("IQ-OTH/NCCD, MobileNet-0.25 features: which k each criterion picks", fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
