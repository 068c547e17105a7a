"""A labelled image set from a user: class folders (one holding the positives) or a CSV of
``path,label[,patient_id]``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


class EvaluationInputError(ValueError):
    """A file or value of the evaluation set that cannot be used; the message names it."""


def labelled_files(
    images_root: str = "", positive_class: str = "", labels_csv: str = ""
) -> pd.DataFrame:
    """path, label (0/1) and patient_id (may be empty) of every image of the set."""
    if images_root:
        root = Path(images_root)
        if not root.is_dir():
            raise EvaluationInputError(f"images_root is not a folder: {root}")
        folders = sorted(p.name for p in root.iterdir() if p.is_dir())
        if positive_class not in folders:
            raise EvaluationInputError(
                f"no sub-folder named {positive_class!r} under {root}; found: "
                f"{', '.join(folders) or 'none'}"
            )
        rows = [
            {"path": str(f), "label": int(folder == positive_class), "patient_id": ""}
            for folder in folders
            for f in sorted((root / folder).rglob("*"))
            if f.is_file() and not f.name.startswith(".")
        ]
        table = pd.DataFrame(rows, columns=["path", "label", "patient_id"])
    else:
        csv = Path(labels_csv)
        if not csv.is_file():
            raise EvaluationInputError(f"labels_csv not found: {csv}")
        table = pd.read_csv(csv, dtype={"patient_id": str})
        missing = {"path", "label"} - set(table.columns)
        if missing:
            raise EvaluationInputError(
                f"labels_csv {csv} needs columns path,label[,patient_id]; missing {sorted(missing)}"
            )
        bad = table.loc[~table["label"].astype(str).isin(["0", "1"]), "label"]
        if len(bad):
            raise EvaluationInputError(
                f"labels_csv {csv}: labels must be 0 or 1, found {sorted(set(map(str, bad)))[:5]}"
            )
        table["path"] = [str(p if Path(p).is_absolute() else csv.parent / p) for p in table["path"]]
        table["label"] = table["label"].astype(int)
        table["patient_id"] = table["patient_id"].fillna("") if "patient_id" in table else ""
    if table.empty:
        raise EvaluationInputError(f"no image files in {images_root or labels_csv}")
    return table[["path", "label", "patient_id"]].reset_index(drop=True)
