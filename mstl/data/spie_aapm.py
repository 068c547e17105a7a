"""The SPIE-AAPM Lung CT Challenge (LUNGx), the paper's Transition set: download its 70 CT series
from TCIA (``mstl.data.nbia``) and turn TCIA's two truth spreadsheets into labels.

The spreadsheets are read as TCIA serves them, traps included: the calibration file spells ids in
lower case (``CT-Training-lc001``) while the DICOM PatientID is upper case, and the test file's ids
are mixed case (``LUNGx-CT001``), so ids are joined trimmed and upper-cased but written as the
series list spells them; diagnoses come with a trailing space or in other words; the x,y cell is a
string ("120, 325") in one copy and may be a number in another; footnote rows follow the data.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import openpyxl
import pandas as pd

from mstl.data import nbia

COLLECTION = "SPIE-AAPM Lung CT Challenge"
TEST_XLSX = "TestSet_NoduleData_PublicRelease_wTruth.xlsx"
CALIBRATION_XLSX = "CalibrationSet_NoduleData.xlsx"
MATRIX = 512  # every image is 512 x 512 (the spreadsheets' footnote); x,y count from (1, 1)
# diagnosis text (whitespace collapsed, lower case) -> 1 malignant, 0 benign
DIAGNOSES = {
    "primary lung cancer": 1,
    "suspicious malignant nodule": 1,
    "malignant": 1,
    "benign nodule": 0,
    "benign": 0,
}
# the columns each file must have, by role; header text is compared without case, spaces or
# punctuation, so "Nodule Center x,y Position*" also matches "Nodule center x, y position"
COLUMNS = {
    "test": {
        "scan": "Scan Number",
        "nodule": "Nodule Number",
        "xy": "Nodule Center x,y Position*",
        "slice": "Nodule Center Image",
        "diagnosis": "Final Diagnosis",
    },
    "calibration": {
        "scan": "Scan Number",
        "xy": "Nodule Center x,y Position*",
        "slice": "Nodule Center Image",
        "diagnosis": "Diagnosis",
    },
}
ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")
XY_RE = re.compile(r"^\(?\s*(\d+)\s*[,;\s]\s*(\d+)\s*\)?$")
HEADER_SEARCH_ROWS = 10
NODULE_COLUMNS = [
    "patient_id",
    "series_instance_uid",
    "scan",
    "nodule",
    "x",
    "y",
    "slice",
    "diagnosis",
    "label",
    "source",
    "row",
]
SCAN_COLUMNS = [
    "patient_id",
    "series_instance_uid",
    "label",
    "label_name",
    "diagnosis",
    "nodules",
    "source",
]
PATIENT_COLUMNS = ("Subject ID", "PatientID", "patient_id")
SERIES_COLUMNS = ("Series UID", "SeriesInstanceUID", "series_instance_uid")


class TruthError(ValueError):
    """A truth spreadsheet this module will not guess about; names the file, row and value."""


def header_key(text: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(text).lower())


def id_key(scan: str) -> str:
    """How ids are joined: trimmed and upper-cased (TCIA spells them three ways)."""
    return str(scan).strip().upper()


def parse_xy(value: object, where: str) -> tuple[int, int]:
    """(x, y) in pixels from the x,y cell: text such as "120, 325", or a whole number that Excel
    made of "120,325" by reading the comma as a thousands separator (120325 -> 120, 325). Any
    other number (a decimal: which digits are y?) is refused, as is a point off the image."""
    if isinstance(value, bool) or value is None:
        raise TruthError(f"{where}: x,y cell is empty or not a position: {value!r}")
    if isinstance(value, int | float):
        if float(value) != int(value) or value < 1000:
            raise TruthError(
                f"{where}: x,y cell is the number {value!r}; cannot tell x from y "
                "(expected text like '120, 325' or 120325 from a thousands separator)"
            )
        x, y = divmod(int(value), 1000)
    else:
        match = XY_RE.match(str(value).strip())
        if not match:
            raise TruthError(f"{where}: x,y cell {value!r} is not 'x, y'")
        x, y = int(match[1]), int(match[2])
    if not (1 <= x <= MATRIX and 1 <= y <= MATRIX):
        raise TruthError(f"{where}: x,y {value!r} gives ({x}, {y}), off a {MATRIX}-pixel image")
    return x, y


def parse_int(value: object, what: str, where: str) -> int:
    """A positive whole number from a cell (an int, an integral float or digits as text)."""
    text = str(value).strip()
    if isinstance(value, float) and value.is_integer():
        text = str(int(value))
    if value is None or isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise TruthError(f"{where}: {what} {value!r} is not a positive whole number")
    return int(text)


def parse_diagnosis(value: object, where: str) -> tuple[str, int]:
    """(diagnosis as written but trimmed, 1 malignant or 0 benign)."""
    text = " ".join(str(value).split()) if value is not None else ""
    if text.lower() not in DIAGNOSES:
        raise TruthError(f"{where}: unknown diagnosis {value!r}; known: {sorted(DIAGNOSES)}")
    return text, DIAGNOSES[text.lower()]


def find_header(rows: list[tuple], kind: str, where: str) -> tuple[int, dict[str, int]]:
    """(index of the header row, {role: column index}); a missing column is an error naming it
    and the columns found."""
    wanted = COLUMNS[kind]
    for index, row in enumerate(rows[:HEADER_SEARCH_ROWS]):
        keys = [header_key(cell) if cell is not None else "" for cell in row]
        if header_key(wanted["scan"]) not in keys:
            continue
        missing = [name for name in wanted.values() if header_key(name) not in keys]
        if missing:
            found = [cell for cell in row if cell is not None]
            raise TruthError(f"{where} row {index + 1}: missing column(s) {missing}; has {found}")
        return index, {role: keys.index(header_key(name)) for role, name in wanted.items()}
    raise TruthError(f"{where}: no header row with {wanted['scan']!r} in its first rows")


def load_rows(path: Path) -> tuple[str, list[tuple]]:
    """(sheet name, rows) of the first sheet with a 'Scan Number' header (the calibration file's
    second sheet is empty)."""
    with warnings.catch_warnings():
        # openpyxl, while it reads: "Unknown extension is not supported and will be removed"
        warnings.filterwarnings("ignore", message="Unknown extension", category=UserWarning)
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            sheets = [(ws.title, list(ws.iter_rows(values_only=True))) for ws in book.worksheets]
        finally:
            book.close()
    key = header_key("Scan Number")
    for title, rows in sheets:
        if any(key in (header_key(c) for c in row) for row in rows[:HEADER_SEARCH_ROWS]):
            return title, rows
    return sheets[0] if sheets else ("", [])


def is_footnote(row: tuple, columns: dict[str, int]) -> bool:
    """A row whose only text is in the scan column and is not an id (the '*specified in pixels'
    note, 'All images are in DICOM format'), or an empty row."""
    others = [row[i] for role, i in columns.items() if role != "scan" and i < len(row)]
    if any(v is not None and str(v).strip() for v in others):
        return False
    scan = row[columns["scan"]] if columns["scan"] < len(row) else None
    return scan is None or not ID_RE.match(str(scan).strip())


def parse_row(row: tuple, columns: dict[str, int], where: str, number: int) -> dict:
    cell = {role: row[i] if i < len(row) else None for role, i in columns.items()}
    scan = str(cell["scan"] or "").strip()
    if not ID_RE.match(scan):
        raise TruthError(f"{where}: scan id {cell['scan']!r} is not an id")
    diagnosis, label = parse_diagnosis(cell["diagnosis"], where)
    x, y = parse_xy(cell["xy"], where)
    nodule = parse_int(cell["nodule"], "nodule number", where) if "nodule" in cell else number
    return {
        "scan": scan,
        "nodule": nodule,
        "x": x,
        "y": y,
        "slice": parse_int(cell["slice"], "Nodule Center Image", where),
        "diagnosis": diagnosis,
        "label": label,
    }


def read_truth(path: str | os.PathLike, kind: str) -> pd.DataFrame:
    """One truth spreadsheet (``kind`` 'test' or 'calibration') as one row per nodule: scan,
    nodule, x, y, slice, diagnosis, label, source, row (the spreadsheet's row number). Footnote
    rows are dropped; anything else that does not parse is a TruthError naming file, row, value."""
    path = Path(path)
    if kind not in COLUMNS:
        raise ValueError(f"kind must be one of {sorted(COLUMNS)}, not {kind!r}")
    sheet, rows = load_rows(path)
    header, columns = find_header(rows, kind, f"{path.name} sheet {sheet!r}")
    nodules, per_scan = [], {}
    for index in range(header + 1, len(rows)):
        row = rows[index]
        if is_footnote(row, columns):
            continue
        where = f"{path.name} sheet {sheet!r} row {index + 1}"
        scan = str(row[columns["scan"]]).strip()
        per_scan[id_key(scan)] = per_scan.get(id_key(scan), 0) + 1
        nodules.append({**parse_row(row, columns, where, per_scan[id_key(scan)]), "row": index + 1})
    if not nodules:
        raise TruthError(f"{path.name} sheet {sheet!r}: no nodule rows under the header")
    table = pd.DataFrame(nodules).assign(source=kind)
    duplicated = table[table.assign(k=table["scan"].map(id_key)).duplicated(["k", "nodule"])]
    if len(duplicated):
        first = duplicated.iloc[0]
        raise TruthError(f"{path.name} row {first['row']}: nodule {first['nodule']} repeated")
    return table


def read_nodules(test_xlsx: str | os.PathLike, calibration_xlsx: str | os.PathLike) -> pd.DataFrame:
    """Both spreadsheets, one row per nodule; a scan in both is an error."""
    test, calibration = read_truth(test_xlsx, "test"), read_truth(calibration_xlsx, "calibration")
    both = set(test["scan"].map(id_key)) & set(calibration["scan"].map(id_key))
    if both:
        raise TruthError(f"scans in both {test_xlsx} and {calibration_xlsx}: {sorted(both)}")
    return pd.concat([test, calibration], ignore_index=True)


def scan_labels(nodules: pd.DataFrame) -> pd.DataFrame:
    """One row per scan: malignant (1) when any nodule is, else benign (0)."""
    grouped = nodules.assign(key=nodules["scan"].map(id_key)).groupby("key", sort=True)
    table = grouped.agg(
        scan=("scan", "first"),
        label=("label", "max"),
        diagnosis=("diagnosis", lambda d: "; ".join(dict.fromkeys(d))),
        nodules=("nodule", "size"),
        source=("source", "first"),
    ).reset_index()
    table["label_name"] = table["label"].map({1: "malignant", 0: "benign"})
    return table


def pick_column(table: pd.DataFrame, names: Iterable[str], path: object) -> str:
    found = next((name for name in names if name in table.columns), None)
    if found is None:
        raise TruthError(f"{path}: needs one of the columns {list(names)}; has {list(table)}")
    return found


def read_series_list(series_csv: str | os.PathLike) -> pd.DataFrame:
    """(patient_id, series_instance_uid, key) from an NBIA Data Retriever ``metadata.csv``, a
    getSeries listing or the ``series.csv`` a download writes."""
    table = pd.read_csv(series_csv, dtype=str)
    patient = pick_column(table, PATIENT_COLUMNS, series_csv)
    series = pick_column(table, SERIES_COLUMNS, series_csv)
    out = pd.DataFrame(
        {"patient_id": table[patient].str.strip(), "series_instance_uid": table[series].str.strip()}
    )
    return out.assign(key=out["patient_id"].map(id_key))


@dataclass
class SeriesMatch:
    """Scans joined to series; ids on either side that found no partner."""

    table: pd.DataFrame
    unmatched_scans: list[str]
    unmatched_series: list[str]

    @property
    def complete(self) -> bool:
        return not self.unmatched_scans and not self.unmatched_series


def match_series(scans: pd.DataFrame, series_csv: str | os.PathLike) -> SeriesMatch:
    """Join per-scan labels to the series list on trimmed, upper-cased ids, one row per series;
    the patient id is written as the series list spells it (the DICOM PatientID)."""
    series = read_series_list(series_csv)
    keyed = scans.assign(key=scans["scan"].map(id_key))
    table = keyed.merge(series, on="key", how="inner").sort_values(["key", "series_instance_uid"])
    unmatched_scans = sorted(set(keyed["scan"][~keyed["key"].isin(series["key"])]))
    unmatched_series = sorted(set(series["patient_id"][~series["key"].isin(keyed["key"])]))
    return SeriesMatch(table.reset_index(drop=True), unmatched_scans, unmatched_series)


def write_csv(table: pd.DataFrame, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def write_labels(
    test_xlsx: str | os.PathLike,
    calibration_xlsx: str | os.PathLike,
    series_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    strict: bool = True,
) -> tuple[Path, Path]:
    """``labels.csv`` (one row per series: patient_id, series_instance_uid, label 1 malignant / 0
    benign, label_name, diagnosis, nodules, source), the ``labels_csv`` prepare_transition reads
    (keyed by series_instance_uid), and ``nodules.csv`` (one row per nodule with x, y, slice).
    With ``strict`` a scan without a series, or a series without a scan, is an error naming them."""
    nodules = read_nodules(test_xlsx, calibration_xlsx)
    match = match_series(scan_labels(nodules), series_csv)
    if strict and not match.complete:
        raise TruthError(
            f"truth and series list {series_csv} disagree: scans without a series "
            f"{match.unmatched_scans}, series without a scan {match.unmatched_series}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scans = write_csv(match.table[SCAN_COLUMNS], out / "labels.csv")
    ids = match.table[["key", "patient_id", "series_instance_uid"]]
    per_nodule = nodules.assign(key=nodules["scan"].map(id_key)).merge(ids, on="key", how="left")
    per_nodule = per_nodule.sort_values(["key", "nodule"])
    return scans, write_csv(per_nodule[NODULE_COLUMNS], out / "nodules.csv")


def download_collection(
    dest: str | os.PathLike,
    base_url: str = nbia.DEFAULT_BASE_URL,
    patients: Iterable[str] | None = None,
    progress: nbia.Progress = print,
    retry: nbia.Retry | None = None,
    endpoint: str = "getImage",
) -> nbia.DownloadSummary:
    """Download and verify the collection's CT series (or ``patients`` of them) into ``dest``,
    resuming a previous run; ``dest/series.csv`` then serves as ``series_csv``."""
    return nbia.download(COLLECTION, dest, base_url, patients, progress, retry, endpoint)
