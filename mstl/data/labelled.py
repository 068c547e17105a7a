"""A labelled image set from a user: class folders (one holding the positives) or a CSV of
``path,label[,patient_id]``, with each image's patient from the CSV or from its file name.

Every row names its file twice: ``path`` (what is read) and ``file`` (the path as the user knows it:
relative to ``images_root``, or the CSV's ``path`` entry as written), so a table of results can be
traced back to the images it was made from. ``patient_pattern`` is a regular expression searched in
``file``; its group ``patient`` (or its only group) is the patient. A file it does not match is an
error naming the file: a slice is never left out of the patient grouping silently.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

COLUMNS = ["path", "file", "label", "patient_id"]


class EvaluationInputError(ValueError):
    """A file or value of the evaluation set that cannot be used; the message names it."""


def compile_patient_pattern(pattern: str) -> re.Pattern:
    """``pattern`` compiled, with a group ``patient`` or exactly one group; else a clear error."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise EvaluationInputError(f"patient_pattern {pattern!r} is not a regex: {exc}") from None
    if "patient" not in compiled.groupindex and compiled.groups != 1:
        raise EvaluationInputError(
            f"patient_pattern {pattern!r} needs one group, or a group named 'patient', that "
            f"captures the patient id; it has {compiled.groups} groups"
        )
    return compiled


def patients_from_pattern(files, pattern: str) -> list[str]:
    """The patient of each file: ``pattern``'s ``patient`` group (or its only group) searched in
    the file's relative path; a file it does not match, or matches with an empty id, is an error."""
    compiled = compile_patient_pattern(pattern)
    group = "patient" if "patient" in compiled.groupindex else 1
    patients = []
    for file in files:
        match = compiled.search(file)
        patient = match.group(group) if match else None
        if not patient:
            found = "does not match" if match is None else "matches with an empty patient id"
            raise EvaluationInputError(
                f"patient_pattern {pattern!r} {found} the file {file!r} (applied to the path "
                "relative to images_root, or to labels_csv's path entry)"
            )
        patients.append(patient)
    return patients


def folder_files(images_root: str, positive_class: str) -> pd.DataFrame:
    """One row per file under ``images_root``'s class folders; label 1 under ``positive_class``."""
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
        {
            "path": str(f),
            "file": f.relative_to(root).as_posix(),
            "label": int(folder == positive_class),
            "patient_id": "",
        }
        for folder in folders
        for f in sorted((root / folder).rglob("*"))
        if f.is_file() and not f.name.startswith(".")
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def csv_files(labels_csv: str, patient_pattern: str = "") -> pd.DataFrame:
    """The CSV's rows, paths resolved against its folder; ``patient_pattern`` and a
    ``patient_id`` column exclude each other (two sources of one fact would disagree)."""
    csv = Path(labels_csv)
    if not csv.is_file():
        raise EvaluationInputError(f"labels_csv not found: {csv}")
    table = pd.read_csv(csv, dtype={"path": str, "patient_id": str})
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise EvaluationInputError(
            f"labels_csv {csv} needs columns path,label[,patient_id]; missing {sorted(missing)}"
        )
    if patient_pattern and "patient_id" in table:
        raise EvaluationInputError(
            f"labels_csv {csv} has a patient_id column and patient_pattern is set: give one"
        )
    bad = table.loc[~table["label"].astype(str).isin(["0", "1"]), "label"]
    if len(bad):
        raise EvaluationInputError(
            f"labels_csv {csv}: labels must be 0 or 1, found {sorted(set(map(str, bad)))[:5]}"
        )
    table["file"] = table["path"]
    table["path"] = [str(p if Path(p).is_absolute() else csv.parent / p) for p in table["path"]]
    table["label"] = table["label"].astype(int)
    table["patient_id"] = table["patient_id"].fillna("") if "patient_id" in table else ""
    return table


def labelled_files(
    images_root: str = "", positive_class: str = "", labels_csv: str = "", patient_pattern: str = ""
) -> pd.DataFrame:
    """path, file (as the user names it), label (0/1) and patient_id (empty where unknown) of
    every image of the set."""
    if images_root:
        table = folder_files(images_root, positive_class)
    else:
        table = csv_files(labels_csv, patient_pattern)
    if table.empty:
        raise EvaluationInputError(f"no image files in {images_root or labels_csv}")
    if patient_pattern:
        table["patient_id"] = patients_from_pattern(table["file"], patient_pattern)
    return table[COLUMNS].reset_index(drop=True)
