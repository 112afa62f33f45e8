"""The on-disk image-address dataset every stage reads: layout, columns, address styles, I/O.

A dataset is a folder:

    images/               image root; the `image` column holds paths relative to it
    records.parquet       one row per kept image (COLUMNS below); `split` is train / val / test
    sub_streets.geojson   one feature per sub-street (WGS84 LineString/MultiLineString) with its
                          address fields as properties: used for distance errors, maps, hard negatives
    dataset_info.json     city, UTM EPSG code, builder configuration, counts
    build_report.json     rows kept and rejected, by reason
    rejects.jsonl         every dropped input row with its reason

`records.parquet` is plain parquet: `datasets.load_dataset("parquet", data_files=...)`, pandas and
pyarrow all read it. `read_records` and `as_hf_dataset` below are the toolkit's readers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from clip_stage.core.registry import Registry

RECORDS_FILE = "records.parquet"
SUB_STREETS_FILE = "sub_streets.geojson"
INFO_FILE = "dataset_info.json"
REPORT_FILE = "build_report.json"
REJECTS_FILE = "rejects.jsonl"
IMAGES_DIR = "images"
SPLITS = ("train", "val", "test")

# Column -> meaning. Every writer produces all of them; readers may rely on them.
COLUMNS: dict[str, str] = {
    "image_id": "unique id of the image (str)",
    "image": "image path relative to the image root (str)",
    "lat": "latitude, WGS84 degrees (float)",
    "lon": "longitude, WGS84 degrees (float)",
    "utm_x": "UTM easting in metres (float; zone in dataset_info.json)",
    "utm_y": "UTM northing in metres (float)",
    "street": "main street name (str)",
    "sub_street": "sub-street id, unique in the city, e.g. 'Mannerheimintie/3' (str)",
    "cross_streets": "names of the 0-2 cross streets bounding the sub-street (list[str])",
    "neighbourhood": "neighbourhood / district name (str)",
    "city": "city name (str)",
    "address_full": "address in the 'full' style (str)",
    "address_canonical": "address in the 'canonical' style (str)",
    "address_street": "address in the 'street' style (str)",
    "address_sub_street": "address in the 'sub_street' style (str)",
    "address_neighbourhood": "address in the 'neighbourhood' style: 'neighbourhood, city'; only the city (or '') where no neighbourhood is known, never the street (str)",
    "caption": "scene caption, '' until captioned (str)",
    "split": "train / val / test (str)",
}


@dataclass(frozen=True)
class Address:
    """One structured street-level address; every text style is rendered from it."""

    street: str
    sub_street: str
    cross_streets: tuple[str, ...] = ()
    neighbourhood: str = ""
    city: str = ""
    junction: bool = False
    """an intersection of all its streets (published IAL addresses: 'A & B & C'), not a stretch between two crossings"""

    @classmethod
    def from_row(cls, row) -> "Address":
        cross = row["cross_streets"]
        cross = tuple(str(c) for c in (list(cross) if cross is not None else []) if str(c))
        return cls(
            street=str(row["street"]),
            sub_street=str(row["sub_street"]),
            cross_streets=cross,
            neighbourhood=str(row.get("neighbourhood", "") or ""),
            city=str(row.get("city", "") or ""),
            junction=bool(row.get("junction", False) == True),  # noqa: E712 (a missing value is NaN, not False)
        )


def _place(a: Address) -> str:
    return ", ".join(p for p in (a.neighbourhood, a.city) if p)


def _segment(a: Address) -> str:
    """'X between A and B' / 'X near A' (dead end or one cross street) / 'X'; an intersection: 'X & A & B'."""
    if a.junction and a.cross_streets:
        return " & ".join((a.street, *a.cross_streets))
    if len(a.cross_streets) >= 2:
        return f"{a.street} between {a.cross_streets[0]} and {a.cross_streets[1]}"
    if len(a.cross_streets) == 1:
        return f"{a.street} near {a.cross_streets[0]}"
    return a.street


def _full(a: Address) -> str:
    return ", ".join(p for p in (_segment(a), _place(a)) if p)


def _canonical(a: Address) -> str:
    head = ", ".join(p for p in (a.street, a.neighbourhood) if p)
    return f"{head} ({' & '.join(a.cross_streets)})" if a.cross_streets else head


def _intersection(a: Address) -> str:
    """The paper's style: 'Forbes Avenue & Craig Street, Oakland'."""
    head = " & ".join((a.street, *(a.cross_streets if a.junction else a.cross_streets[:1])))
    return ", ".join(p for p in (head, a.neighbourhood) if p)


ADDRESS_STYLES: Registry[Callable[[Address], str]] = Registry("address style")
register_style = ADDRESS_STYLES.register

register_style("full", _full)
register_style("canonical", _canonical)
register_style("street", lambda a: a.street)
register_style("sub_street", _segment)
# never the street name: a row with no neighbourhood renders only its city ('' with no city either), so a
# street can never pose as a place; the conversation builder asks no "place" question for such rows
register_style("neighbourhood", _place)
register_style("intersection", _intersection)

# The styles stored as `address_<style>` columns.
STORED_STYLES = ("full", "canonical", "street", "sub_street", "neighbourhood")


def render_address(address: Address, style: str = "full") -> str:
    return ADDRESS_STYLES.lookup(style)(address)


def address_columns(address: Address) -> dict[str, str]:
    return {f"address_{s}": render_address(address, s) for s in STORED_STYLES}


@dataclass
class DatasetPaths:
    root: Path
    images: Path = field(init=False)
    records: Path = field(init=False)
    sub_streets: Path = field(init=False)
    info: Path = field(init=False)
    report: Path = field(init=False)
    rejects: Path = field(init=False)

    def __post_init__(self):
        self.root = Path(self.root)
        self.images = self.root / IMAGES_DIR
        self.records = self.root / RECORDS_FILE
        self.sub_streets = self.root / SUB_STREETS_FILE
        self.info = self.root / INFO_FILE
        self.report = self.root / REPORT_FILE
        self.rejects = self.root / REJECTS_FILE


class DatasetFormatError(ValueError):
    """A dataset folder or table that does not follow the layout above."""


def _check_labels(df: pd.DataFrame, where: Path) -> None:
    """Every row has a split of SPLITS and a street and sub-street label: a dataset without them would be
    evaluated (and trained on) as if every answer were wrong, with no word of why."""
    def refuse(mask: pd.Series, problem: str) -> None:
        i = int(mask.to_numpy().argmax())
        more = f" ({int(mask.sum()) - 1} more rows like it)" if mask.sum() > 1 else ""
        raise DatasetFormatError(f"{where}: record {i} (image_id={str(df['image_id'].iloc[i])!r}): {problem}{more}")

    bad_split = ~df["split"].isin(SPLITS)
    if bad_split.any():
        refuse(bad_split, f"field 'split' is {df['split'][bad_split].iloc[0]!r}, not one of {', '.join(SPLITS)}")
    for column in ("street", "sub_street"):
        empty = df[column].isna() | (df[column].astype(str).str.strip() == "")
        if empty.any():
            refuse(empty, f"field {column!r} is empty")


def read_records(dataset_dir: str | Path, split: str | None = None) -> pd.DataFrame:
    """Reads `records.parquet`, checks the columns, optionally keeps one split (index reset)."""
    paths = DatasetPaths(dataset_dir)
    if not paths.records.exists():
        raise DatasetFormatError(f"{paths.records}: not found (is {dataset_dir} an address dataset folder?)")
    df = pd.read_parquet(paths.records)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DatasetFormatError(f"{paths.records}: missing columns {missing}")
    _check_labels(df, paths.records)
    if split is not None:
        if split not in SPLITS:
            raise DatasetFormatError(f"unknown split {split!r}; valid: {SPLITS}")
        df = df[df["split"] == split].reset_index(drop=True)
    return df


def check_record_images(dataset_dir: str | Path, df: pd.DataFrame, must_exist: bool = True) -> None:
    """Every record's image lies inside the dataset's image folder and (`must_exist`) is there (one stat per row),
    so a bad row is one line naming the file and the record before a model loads, not a DataLoader failure
    mid-training. Commands that only pass paths on (conversations) check where they point, not the files."""
    from clip_stage.core.fs import UnsafePathError, resolve_under_root

    paths = DatasetPaths(dataset_dir)
    bad: list[tuple[str, str]] = []
    for image_id, rel in zip(df["image_id"].astype(str), df["image"].astype(str)):
        try:
            full = resolve_under_root(paths.images, rel)
            if must_exist and not full.is_file():
                bad.append((image_id, f"image {rel!r} not found in {paths.images}"))
        except UnsafePathError as e:
            bad.append((image_id, str(e)))
    if bad:
        more = f" ({len(bad) - 1} more records like it)" if len(bad) > 1 else ""
        raise DatasetFormatError(f"{paths.records}: record image_id={bad[0][0]!r}: {bad[0][1]}{more}")


def records_fingerprint(records: pd.DataFrame) -> str:
    """sha256 of what identifies and labels each image (image_id, image, split, sub_street), in image_id order:
    two datasets with one fingerprint have the same images, splits and labels (their captions may differ)."""
    import hashlib

    cols = records[["image_id", "image", "split", "sub_street"]].astype(str).sort_values("image_id")
    h = hashlib.sha256()
    for row in cols.itertuples(index=False):
        h.update(("\t".join(row) + "\n").encode("utf-8"))
    return h.hexdigest()


def empty_captions(df: pd.DataFrame) -> np.ndarray:
    """Per row: the `caption` column is missing, null or blank (the row still needs captioning)."""
    if "caption" not in df.columns:
        return np.ones(len(df), dtype=bool)
    return df["caption"].fillna("").astype(str).str.strip().eq("").to_numpy()


def as_hf_dataset(dataset_dir: str | Path, split: str | None = None):
    """The records as a Hugging Face `datasets.Dataset`."""
    import datasets

    return datasets.Dataset.from_pandas(read_records(dataset_dir, split), preserve_index=False)


def write_records(df: pd.DataFrame, path: str | Path) -> None:
    """Writes the table (all COLUMNS first, extra columns kept after them)."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DatasetFormatError(f"cannot write {path}: missing columns {missing}")
    extra = [c for c in df.columns if c not in COLUMNS]
    df[list(COLUMNS) + extra].to_parquet(path, index=False)


class RecordsWriter:
    """Writes `records.parquet` slice by slice (Arrow tables with all COLUMNS; extra columns after them),
    so that a million-row dataset never has to be one DataFrame. Use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._writer = None
        self._order: list[str] = []

    def write(self, table) -> None:
        import pyarrow.parquet as pq

        if self._writer is None:
            missing = [c for c in COLUMNS if c not in table.column_names]
            if missing:
                raise DatasetFormatError(f"cannot write {self.path}: missing columns {missing}")
            self._order = list(COLUMNS) + [c for c in table.column_names if c not in COLUMNS]
            table = table.select(self._order)
            self._writer = pq.ParquetWriter(self.path, table.schema)
        else:
            table = table.select(self._order)
        self._writer.write_table(table)

    def __enter__(self) -> "RecordsWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.close()


def read_info(dataset_dir: str | Path) -> dict:
    path = DatasetPaths(dataset_dir).info
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetFormatError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path}: malformed JSON ({e})") from None


def read_sub_streets(dataset_dir: str | Path) -> list[dict]:
    """The sub-street features: each {'geometry': shapely geometry (WGS84), **properties}."""
    from shapely.geometry import shape

    path = DatasetPaths(dataset_dir).sub_streets
    try:
        fc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetFormatError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path}: malformed JSON ({e})") from None
    return [{"geometry": shape(f["geometry"]), **f["properties"]} for f in fc["features"]]
