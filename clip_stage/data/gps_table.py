"""Reading build-dataset's GPS table (CSV or JSONL: image, lat, lon [, caption, image_id]) in chunks.

`iter_gps_table` streams the table in chunks of canonical columns (aliases such as latitude/lng renamed,
missing optional columns None) together with the rows that cannot be read at all (`malformed_row`); a
table that cannot be read at all (missing file, unknown format, missing columns) is a GpsTableError.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from clip_stage.core.fs import iter_jsonl


class GpsTableError(ValueError):
    """A GPS table that cannot be read at all (missing file, unknown format, missing columns)."""


_ALIASES = {"lat": ("lat", "latitude"), "lon": ("lon", "lng", "long", "longitude")}
TABLE_COLUMNS = ["row", "image", "lat", "lon", "caption", "image_id"]


def _table_frame(path: Path, records: list[dict], columns_checked: bool) -> pd.DataFrame:
    """One chunk of records -> the canonical columns (aliases renamed, missing optional ones None)."""
    df = pd.DataFrame.from_records(records) if records else pd.DataFrame({"row": pd.Series(dtype=np.int64)})
    for canon, names in _ALIASES.items():
        found = [n for n in names if n in df.columns]
        if found and found[0] != canon:
            df = df.rename(columns={found[0]: canon})
    if records and not columns_checked:
        missing = [c for c in ("image", "lat", "lon") if c not in df.columns]
        if missing:
            raise GpsTableError(f"{path}: missing column(s) {missing}; found {[c for c in df.columns if c != 'row']}")
    for c in TABLE_COLUMNS[1:]:
        if c not in df.columns:
            df[c] = None
    return df[TABLE_COLUMNS].reset_index(drop=True)


# JSON types each column may have (a CSV cell is always text): anything else would be coerced silently,
# a caption 5 into "5.0", an image list into the path "['a.png']".
_JSONL_TYPES = {"image": (str,), "caption": (str, type(None)), "image_id": (str, int, type(None)),
                "lat": (int, float, str), "lon": (int, float, str)}


def _jsonl_type_problem(record: dict) -> tuple[str, str] | None:
    """(field, detail) of the first column whose JSON type is not one it can have, else None."""
    for field, types in _JSONL_TYPES.items():
        value = record.get(field)
        if field in record and (not isinstance(value, types) or isinstance(value, bool)):
            allowed = " or ".join("null" if t is type(None) else {str: "a string", int: "an integer",
                                                                   float: "a number"}[t] for t in types)
            return field, f"{field} is {type(value).__name__} {json.dumps(value)[:60]}, expected {allowed}"
    return None


def _records(path: Path) -> Iterator[tuple[dict | None, dict | None]]:
    """(record with its `row`, None) or (None, malformed-row reject) per record of a CSV/TSV/JSONL table."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        for line in iter_jsonl(path):
            if line.error is not None:
                yield None, {"row": line.lineno, "field": "row", "reason": "malformed_row", "detail": line.error}
            elif not isinstance(line.value, dict):
                yield None, {"row": line.lineno, "field": "row", "reason": "malformed_row", "detail": "not a JSON object"}
            elif (problem := _jsonl_type_problem(line.value)) is not None:
                yield None, {"row": line.lineno, "field": problem[0], "reason": "malformed_row", "detail": problem[1]}
            else:
                yield {**line.value, "row": line.lineno}, None  # a column named "row" cannot replace the record number
    elif suffix in (".csv", ".tsv"):
        # the csv module, not pandas' chunked reader: it reports each over-long record with its exact
        # record number (quoted newlines included), which pandas' fast engine cannot
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
            header = next(reader, None)
            if not header:
                raise GpsTableError(f"{path}: empty file (expected a header with image, lat, lon)")
            width = len(header)
            for rowno, rec in enumerate(reader, 1):
                if len(rec) > width:
                    yield None, {"row": rowno, "field": "row", "reason": "malformed_row",
                                 "detail": f"{len(rec) - width} more fields than the header"}
                    continue
                if not rec:
                    continue  # a blank line is no record (as csv.DictReader)
                yield {**dict(zip(header, rec)), "row": rowno}, None  # as above
    else:
        raise GpsTableError(f"{path}: unknown GPS table format {suffix!r}; expected .csv, .tsv or .jsonl")


def unread_columns(path: str | Path, sample: int = 1000) -> list[str]:
    """The table's columns that build-dataset does not read (a misspelled "captoin", a "row" column: `row` is
    the record number), from the CSV/TSV header or the keys of the first `sample` JSONL records."""
    path = Path(path)
    known = set(TABLE_COLUMNS[1:]) | {n for names in _ALIASES.values() for n in names}
    columns: dict[str, None] = {}
    if path.suffix.lower() in (".csv", ".tsv"):
        with path.open(encoding="utf-8-sig", newline="") as f:
            columns = dict.fromkeys(next(csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","), []))
    else:
        for i, line in enumerate(iter_jsonl(path)):
            if i >= sample:
                break
            if isinstance(line.value, dict):
                columns.update(dict.fromkeys(line.value))
    return [c for c in columns if c not in known]


def check_table_path(path: Path) -> None:
    if not path.is_file():
        raise GpsTableError(f"{path}: GPS table not found")
    if path.suffix.lower() not in (".csv", ".tsv", ".jsonl", ".ndjson"):
        raise GpsTableError(f"{path}: unknown GPS table format {path.suffix.lower()!r}; expected .csv, .tsv or .jsonl")


def iter_gps_table(path: str | Path, chunk_rows: int = 100_000) -> Iterator[tuple[pd.DataFrame, list[dict]]]:
    """The table in chunks of at most `chunk_rows` records: (columns row, image, lat, lon, caption,
    image_id as read, malformed-row rejects). Memory is bounded by one chunk, whatever the table's size.

    `row` is the 1-based record number (CSV: not counting the header; JSONL: the line number).
    """
    path = Path(path)
    check_table_path(path)
    records: list[dict] = []
    bad: list[dict] = []
    checked = False
    try:
        for rec, rej in _records(path):
            if rej is not None:
                bad.append(rej)
                continue
            records.append(rec)
            if len(records) >= chunk_rows:
                yield _table_frame(path, records, checked), bad
                checked, records, bad = True, [], []
        if records or bad or not checked:
            yield _table_frame(path, records, checked), bad
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise GpsTableError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def read_gps_table(path: str | Path) -> tuple[pd.DataFrame, list[dict]]:
    """The whole table at once (see `iter_gps_table`)."""
    frames, bad = [], []
    for df, rej in iter_gps_table(path, chunk_rows=1 << 62):
        frames.append(df)
        bad += rej
    return pd.concat(frames, ignore_index=True), bad
