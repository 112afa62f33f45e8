"""Loader for the published AddressCLIP datasets (Pitts-IAL, SF-IAL-Base, SF-IAL-Large).

    address-llava load-ial --annotations Pitts-IAL/annotations --coords pitts_utm.csv \\
        --image-root datasets/Pitts-IAL --out data/pitts_ial --city Pittsburgh --utm-epsg 32617

The release ships, per split, a JSON file mapping an image path to `[caption, verbose address,
canonical address]`, e.g.

    {"000/000123_pitch1_yaw1.jpg": ["a street view of a brick house ...",
                                    "5000 Forbes Avenue, Oakland, Pittsburgh, PA 15213",
                                    "Forbes Avenue & Craig Street, Oakland"], ...}

The images themselves (Pittsburgh-250k, SF-XL) and their coordinates come from the original
datasets; the coordinates are given here as a CSV of `filename, easting, northing` (UTM metres; a
header row is optional, columns may be named filename/image/path, easting/utm_x/x, northing/utm_y/y).
A CSV filename matches an annotation key by its full relative path, else by its base name. Without
`--coords`, they are read from SF-XL (CosPlace) file names, `@easting@northing@zone@band@lat@lon@...`.

Output: a dataset folder in the layout of `clip_stage.core.schema`:
- the split comes from the annotation file's name (train / val / test; `--split-map` overrides);
- street, cross streets and neighbourhood are parsed from the canonical address
  ("Forbes Avenue & Craig Street, Oakland"); the published verbose and canonical strings are kept as
  `address_full` and `address_canonical`, the other styles are rendered from the parsed record;
- an intersection of three or more streets ("Centre Avenue & Negley Avenue & Baum Boulevard,
  Shadyside") is a place where all of them meet, not a stretch between two of them: street = the
  first name, cross streets = the others, and its `address_sub_street` keeps the intersection form
  ("Centre Avenue & Negley Avenue & Baum Boulevard"; never "Centre Avenue between Negley Avenue and
  Baum Boulevard"); `build_report.json` counts them as `multi_street_intersections`;
- a sub-street is one distinct canonical address (ids `<street>/<k>`, k in sorted order);
- lat/lon are computed from the UTM coordinates (`--utm-epsg`, e.g. 32617 Pittsburgh, 32610 SF);
- `images` is a symlink to the image root (default) or a copy of the kept images (`--images copy`);
- `sub_streets.geojson` has one line per sub-street along the principal axis of its images' points
  (the release has no street geometry);
- bad rows go to `rejects.jsonl` ({source, row, field, reason, detail}) with the builder's reason names:
  malformed_row (not [caption, verbose, canonical]), bad_address (no street in the canonical address),
  missing_gps / bad_gps / gps_out_of_range (coordinates absent, NaN, unparseable, outside any UTM zone),
  unsafe_path, image_not_found, corrupt_image (with --verify-images), duplicate_path (listed twice);
  a malformed JSON or CSV file is an error naming the file, and nothing is written.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import pandas as pd

from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import command_main
from clip_stage.core.fs import UnsafePathError, atomic_dir, atomic_write_json, resolve_under_root
from clip_stage.core.outdir import check_out_dir, write_marker
from clip_stage.core.schema import INFO_FILE, SPLITS, Address, DatasetPaths, address_columns, write_records


class IALFormatError(ValueError):
    """An annotation or coordinate file that cannot be read as the AddressCLIP release layout."""


@dataclass(frozen=True)
class IALConfig:
    """How to convert a published IAL dataset."""

    city: str
    """city name written to every record (e.g. Pittsburgh, San Francisco)"""
    utm_epsg: int
    """EPSG code of the coordinates' UTM zone (Pittsburgh: 32617, San Francisco: 32610)"""
    images: Literal["symlink", "copy"] = "symlink"
    """how the dataset's images/ folder points at the image root: a symlink, or a copy of the kept images"""
    verify_images: bool = False
    """open every image with PIL and reject unreadable ones (slow on 250k images; default: existence only)"""
    split_map: tuple[tuple[str, str], ...] = ()
    """annotation file name -> split overrides, e.g. (('query.json', 'test'),)"""

    def __post_init__(self):
        if not self.city:
            raise ValueError("city must be given (e.g. --city Pittsburgh)")
        if not (32601 <= self.utm_epsg <= 32660 or 32701 <= self.utm_epsg <= 32760):
            raise ValueError(f"utm_epsg {self.utm_epsg} is not a WGS84 UTM zone (32601-32660 north, 32701-32760 south)")
        if self.images not in ("symlink", "copy"):
            raise ValueError(f"images must be 'symlink' or 'copy', got {self.images!r}")
        for name, split in self.split_map:
            if split not in SPLITS:
                raise ValueError(f"split_map: {name!r} -> {split!r}; valid splits: {SPLITS}")


# --- parsing ---------------------------------------------------------------------------------------

_AMP = re.compile(r"\s*&\s*")
_BETWEEN = re.compile(r"^(?P<street>.+?)\s+between\s+(?P<a>.+?)\s+and\s+(?P<b>.+)$")
_NEAR = re.compile(r"^(?P<street>.+?)\s+near\s+(?P<a>.+)$")


def canonical_form(text: str) -> str:
    """Which form a canonical address has: "between", "near", "intersection" ('A & B ...', two or more
    names) or "street" (one name). Raises ValueError like `parse_canonical`."""
    street, cross, _ = parse_canonical(text)
    head = text.strip().partition(",")[0].strip()
    if _BETWEEN.match(head):
        return "between"
    if _NEAR.match(head):
        return "near"
    return "intersection" if cross else "street"


def parse_canonical(text: str) -> tuple[str, tuple[str, ...], str]:
    """'Forbes Avenue & Craig Street, Oakland' -> ('Forbes Avenue', ('Craig Street',), 'Oakland').

    Also reads 'A & B & C, N', 'A, N' (no cross street), 'A between B and C, N' and 'A near B, N'.
    Raises ValueError when no street name can be found.
    """
    if not isinstance(text, str):
        raise ValueError(f"canonical address is {type(text).__name__}, not a string")
    head, _, tail = text.strip().partition(",")
    neighbourhood = tail.split(",")[0].strip()
    head = head.strip()
    m = _BETWEEN.match(head) or _NEAR.match(head)
    if m:
        names = [m.group("street"), *(m.group(k) for k in ("a", "b") if k in m.groupdict() and m.group(k))]
    else:
        names = _AMP.split(head)
    names = [n.strip() for n in names]
    if not names or not names[0] or any(not n for n in names):
        raise ValueError(f"cannot parse a street out of canonical address {text!r}")
    return names[0], tuple(dict.fromkeys(n for n in names[1:] if n != names[0])), neighbourhood


def split_of(path: Path, split_map: dict[str, str]) -> str:
    """train / val / test from an annotation file name (train.json, Pitts_IAL_test.json, valid.json ...)."""
    for key in (path.name, path.stem):
        if key in split_map:
            return split_map[key]
    words = set(re.split(r"[^a-z]+", path.stem.lower()))
    for split, aliases in (("train", {"train", "training"}), ("val", {"val", "valid", "validation", "dev"}),
                           ("test", {"test", "testing", "query", "eval"})):
        if words & aliases:
            return split
    raise IALFormatError(
        f"{path}: cannot tell the split from the file name; name it train/val/test.json or pass --split-map {path.name}=SPLIT"
    )


def read_annotations(path: Path) -> dict:
    """One annotation file: {image path: [caption, verbose address, canonical address]}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IALFormatError(f"{path}: annotation file not found") from None
    except UnicodeDecodeError as e:
        raise IALFormatError(f"{path}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise IALFormatError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise IALFormatError(
            f"{path}: expected a JSON object mapping image path -> [caption, verbose address, canonical address], "
            f"got a {type(data).__name__}"
        )
    return data


_NAME_COLS = ("filename", "file", "image", "path", "image_path", "name")
_EAST_COLS = ("easting", "utm_x", "x", "east", "utm_east", "utm_easting")
_NORTH_COLS = ("northing", "utm_y", "y", "north", "utm_north", "utm_northing")


def _norm(p: str) -> str:
    p = p.strip().replace("\\", "/")
    while p.startswith("./"):
        p = p[2:]
    return str(PurePosixPath(p)) if p else ""


def read_coords(path: Path) -> tuple[dict[str, tuple[float, float] | str], dict[str, list[str]]]:
    """The coordinates CSV -> ({normalised filename: (easting, northing) or an error text}, {basename: [keys]}).

    A row whose numbers do not parse is kept as an error text (its images are rejected with it); a file
    that is not a 3-column CSV is an IALFormatError naming the file.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise IALFormatError(f"{path}: coordinates file not found") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise IALFormatError(f"{path}: cannot read as CSV ({e})") from None
    rows = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    if not rows:
        raise IALFormatError(f"{path}: empty coordinates file")
    idx = (0, 1, 2)
    first = [c.strip().lower() for c in rows[0][1]]
    if not _is_float(first[1] if len(first) > 1 else ""):
        # a header row: find the three columns by name
        def col(names, what):
            for n in names:
                if n in first:
                    return first.index(n)
            raise IALFormatError(f"{path}: header {rows[0][1]} has no {what} column (one of {list(names)})")

        idx = (col(_NAME_COLS, "filename"), col(_EAST_COLS, "easting"), col(_NORTH_COLS, "northing"))
        rows = rows[1:]
    elif len(first) < 3:
        raise IALFormatError(f"{path}: line {rows[0][0]}: expected 3 columns filename, easting, northing, got {len(first)}")
    coords: dict[str, tuple[float, float] | str] = {}
    by_base: dict[str, list[str]] = defaultdict(list)
    for line, r in rows:
        if len(r) <= max(idx):
            name = r[idx[0]].strip() if len(r) > idx[0] else ""
            if name:
                coords[_norm(name)] = f"{path}: line {line}: expected {max(idx) + 1} columns, got {len(r)}"
                by_base[PurePosixPath(_norm(name)).name].append(_norm(name))
            continue
        name = _norm(r[idx[0]].strip())
        try:
            value: tuple[float, float] | str = (float(r[idx[1]]), float(r[idx[2]]))
        except ValueError:
            value = f"{path}: line {line}: easting/northing {r[idx[1]]!r}, {r[idx[2]]!r} are not numbers"
        if name in coords:
            value = f"{path}: line {line}: {name} has coordinates on two lines"
        coords[name] = value
        by_base[PurePosixPath(name).name].append(name)
    return coords, by_base


def coords_from_filename(path: str, utm_epsg: int) -> tuple[float, float] | str | None:
    """(easting, northing) from an SF-XL / CosPlace image name `@easting@northing@zone@band@lat@lon@...@.jpg`;
    an error text if the name has that form but bad numbers or another UTM zone; None if it has not."""
    fields = PurePosixPath(path).name.split("@")
    if len(fields) < 5 or fields[0] != "":
        return None
    try:
        east, north, zone = float(fields[1]), float(fields[2]), int(fields[3])
    except ValueError:
        return f"file name {path!r}: easting/northing/zone {fields[1:4]} are not numbers"
    if zone != utm_epsg % 100:
        return f"file name {path!r}: UTM zone {zone}{fields[4]} but --utm-epsg {utm_epsg} is zone {utm_epsg % 100}"
    return east, north


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _annotation_files(specs: list[str | Path]) -> list[Path]:
    files: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise IALFormatError(f"{p}: no *.json annotation files in this folder")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise IALFormatError(f"{p}: annotation file or folder not found")
    return list(dict.fromkeys(files))


def _locate(root: Path, key: str) -> tuple[str | None, str, str]:
    """(image path relative to `root` or None, reject reason, detail). Tries the key, then its tails:
    keys often carry the authors' absolute prefix or the dataset's top folder that the root already is."""
    parts = [q for q in PurePosixPath(_norm(key)).parts if q != "/"]
    unsafe = ""
    for k in range(len(parts)):
        rel = str(PurePosixPath(*parts[k:]))
        try:
            full = resolve_under_root(root, rel)
        except UnsafePathError as e:  # a ../ escape: a shorter tail may still be inside the root
            unsafe = unsafe or str(e)
            continue
        if full.is_file():
            return rel, "", ""
    if unsafe:
        return None, "unsafe_path", unsafe
    return None, "image_not_found", f"{key} not found under the image root {root}"


# --- conversion -------------------------------------------------------------------------------------

@dataclass
class _Reject:
    """One dropped annotation entry (same keys as the dataset builder's rejects, plus `source`)."""

    source: str
    row: str
    field: str
    reason: str
    detail: str = ""

    def as_dict(self):
        return {k: v for k, v in asdict(self).items() if v != ""}


def _sub_street_line(xy: np.ndarray) -> np.ndarray:
    """A 2-point line along the principal axis of the points, spanning them (at least 2 m long)."""
    c = xy.mean(0)
    if len(xy) >= 2 and np.ptp(xy, axis=0).max() > 1e-6:
        _, _, vt = np.linalg.svd(xy - c, full_matrices=False)
        d = vt[0]
    else:
        d = np.array([1.0, 0.0])
    t = (xy - c) @ d
    lo, hi = min(t.min(), -1.0), max(t.max(), 1.0)
    return np.stack([c + lo * d, c + hi * d])


def load_ial(annotations: list[str | Path], coords_csv: str | Path | None, image_root: str | Path, out: str | Path,
             cfg: IALConfig) -> dict:
    """Converts a published IAL dataset to `out` (written atomically). Returns the build report.

    `coords_csv=None` reads the UTM coordinates from SF-XL / CosPlace file names instead.
    """
    from pyproj import Transformer

    image_root = Path(image_root)
    if not image_root.is_dir():
        raise IALFormatError(f"{image_root}: image root is not a folder")
    files = _annotation_files(annotations)
    split_map = dict(cfg.split_map)
    file_splits = {f: split_of(f, split_map) for f in files}
    coords, by_base = read_coords(Path(coords_csv)) if coords_csv is not None else ({}, {})
    to_wgs = Transformer.from_crs(f"EPSG:{cfg.utm_epsg}", "EPSG:4326", always_xy=True)

    rows: list[dict] = []
    rejects: list[_Reject] = []
    seen: dict[str, str] = {}
    for f in files:
        split = file_splits[f]
        for key, entry in read_annotations(f).items():
            src = str(f)
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(v, str) for v in entry)):
                rejects.append(_Reject(src, key, "entry", "malformed_row", f"expected [caption, verbose address, canonical address], got {json.dumps(entry)[:200]}"))
                continue
            caption, verbose, canonical = (v.strip() for v in entry)
            try:
                street, cross, neighbourhood = parse_canonical(canonical)
                # 'A & B & C' is where three streets meet: rendered as such, not "A between B and C"
                junction = len(cross) >= 2 and canonical_form(canonical) == "intersection"
            except ValueError as e:
                rejects.append(_Reject(src, key, "canonical_address", "bad_address", str(e)))
                continue
            nk = _norm(key)
            if coords_csv is None:
                c = coords_from_filename(nk, cfg.utm_epsg)
            else:
                c = coords.get(nk)
            if c is None and coords_csv is not None:
                cands = by_base.get(PurePosixPath(nk).name, [])
                if len(cands) == 1:
                    c = coords[cands[0]]
                elif len(cands) > 1:
                    rejects.append(_Reject(src, key, "coords", "missing_gps", f"base name matches {len(cands)} rows of {coords_csv}: {cands[:3]}"))
                    continue
            if c is None:
                where = coords_csv if coords_csv is not None else "its file name (no @easting@northing@zone@ fields)"
                rejects.append(_Reject(src, key, "coords", "missing_gps", f"not in {where}"))
                continue
            if isinstance(c, str):
                rejects.append(_Reject(src, key, "coords", "bad_gps", c))
                continue
            east, north = c
            if not (math.isfinite(east) and math.isfinite(north)):
                rejects.append(_Reject(src, key, "coords", "missing_gps", f"easting/northing {east}, {north} are not finite"))
                continue
            if not (100_000 <= east <= 900_000 and 0 <= north <= 10_000_000):
                rejects.append(_Reject(src, key, "coords", "gps_out_of_range", f"easting/northing {east}, {north} are outside any UTM zone"))
                continue
            rel, reason, why = _locate(image_root, key)
            if rel is None:
                rejects.append(_Reject(src, key, "image", reason, why))
                continue
            if cfg.verify_images:
                why = _unreadable(image_root / rel)
                if why:
                    rejects.append(_Reject(src, key, "image", "corrupt_image", why))
                    continue
            if rel in seen:
                rejects.append(_Reject(src, key, "image", "duplicate_path", f"image already listed in {seen[rel]}"))
                continue
            seen[rel] = src
            rows.append({"image": rel, "utm_x": east, "utm_y": north, "street": street, "cross_streets": list(cross),
                         "neighbourhood": neighbourhood, "caption": caption, "verbose": verbose,
                         "canonical": canonical, "split": split, "junction": junction})
    if not rows:
        raise IALFormatError(f"no usable rows in {[str(f) for f in files]} (rejected: {dict(Counter(r.reason for r in rejects))})")

    df = pd.DataFrame(rows)
    lon, lat = to_wgs.transform(df["utm_x"].to_numpy(), df["utm_y"].to_numpy())
    df["lat"], df["lon"] = lat, lon
    df["city"] = cfg.city
    df["image_id"] = [str(PurePosixPath(p).with_suffix("")) for p in df["image"]]
    clash = df["image_id"].duplicated(keep=False)  # a.jpg and a.png: keep the suffix to stay unique
    df.loc[clash, "image_id"] = df.loc[clash, "image"]
    # a sub-street is one distinct canonical address; ids in sorted order within each street
    sub_id: dict[str, str] = {}
    for street, group in df.groupby("street", sort=True):
        for k, canon in enumerate(sorted(group["canonical"].unique())):
            sub_id[canon] = f"{street}/{k}"
    df["sub_street"] = df["canonical"].map(sub_id)
    # a multi-street intersection is stored as such (`junction`), so every stage that re-renders the address
    # from the record (conversations, gallery, scoring) keeps its intersection form, not "A between B and C"
    df["junction"] = df["junction"].astype(bool)
    addrs = [Address(r.street, r.sub_street, tuple(r.cross_streets), r.neighbourhood, cfg.city, bool(r.junction))
             for r in df.itertuples()]
    styles = pd.DataFrame([address_columns(a) for a in addrs])
    for col in styles.columns:
        df[col] = styles[col].to_numpy()
    df["address_full"] = df["verbose"].where(df["verbose"] != "", df["address_full"])
    df["address_canonical"] = df["canonical"]
    df = df.drop(columns=["verbose", "canonical"])

    features = []
    for sub, g in df.groupby("sub_street", sort=True):
        line = _sub_street_line(g[["utm_x", "utm_y"]].to_numpy())
        lo, la = to_wgs.transform(line[:, 0], line[:, 1])
        first = g.iloc[0]
        features.append({
            "type": "Feature",
            "geometry": {"type": "LineString", "coordinates": [[round(float(a), 7), round(float(b), 7)] for a, b in zip(lo, la)]},
            "properties": {
                "sub_street": sub, "street": first["street"], "cross_streets": list(first["cross_streets"]),
                "neighbourhood": first["neighbourhood"], "city": cfg.city, "junction": bool(first["junction"]),
                "n_images": int(len(g)),
                "length_m": round(float(np.hypot(*(line[1] - line[0]))), 1),
                "address_full": g["address_full"].mode().iloc[0], "address_canonical": first["address_canonical"],
                "address_street": first["address_street"], "address_sub_street": first["address_sub_street"],
                "address_neighbourhood": first["address_neighbourhood"],
            },
        })  # fmt: skip

    report = {
        "kept": int(len(df)),
        "rejected": dict(sorted(Counter(r.reason for r in rejects).items())),
        "rejected_total": len(rejects),
        "images_per_split": {s: int((df["split"] == s).sum()) for s in SPLITS if (df["split"] == s).any()},
        "sub_streets_per_split": {s: int(df.loc[df["split"] == s, "sub_street"].nunique()) for s in SPLITS if (df["split"] == s).any()},
        "sub_streets": int(df["sub_street"].nunique()),
        "streets": int(df["street"].nunique()),
        "multi_street_intersections": int(df.loc[df["junction"], "sub_street"].nunique()),
    }
    root_abs = image_root.resolve()
    with atomic_dir(out) as tmp:
        paths = DatasetPaths(tmp)
        write_marker(tmp, "load-ial")
        if cfg.images == "symlink":
            try:
                os.symlink(root_abs, paths.images, target_is_directory=True)
            except OSError as e:
                raise IALFormatError(f"cannot symlink {paths.images} -> {root_abs} ({e}); use --images copy") from None
        else:
            for rel in df["image"]:
                dst = paths.images / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root_abs / rel, dst)
        write_records(df, paths.records)
        paths.sub_streets.write_text(json.dumps({"type": "FeatureCollection", "features": features}, ensure_ascii=False),
                                     encoding="utf-8")
        atomic_write_json(paths.info, {
            "city": cfg.city, "utm_epsg": cfg.utm_epsg, "source": "AddressCLIP IAL release (load-ial)",
            "annotations": {str(f): file_splits[f] for f in files}, "coords": str(coords_csv) if coords_csv is not None else "from file names",
            "image_root": str(root_abs), "config": {**asdict(cfg), "split_map": dict(cfg.split_map)},
            "num_images": int(len(df)), "num_sub_streets": report["sub_streets"], "num_streets": report["streets"],
        })
        atomic_write_json(paths.report, report)
        with open(paths.rejects, "w", encoding="utf-8") as fh:
            for r in rejects:
                fh.write(json.dumps(r.as_dict(), ensure_ascii=False) + "\n")
    return report


def _unreadable(path: Path) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
        return ""
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        return f"{path}: {type(e).__name__}: {e}"


def _pair(text: str) -> tuple[str, str]:
    name, sep, split = text.partition("=")
    if not sep or not name or not split:
        raise argparse.ArgumentTypeError(f"expected FILE=SPLIT, got {text!r}")
    return name, split


@command_main("load-ial")
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="address-llava load-ial",
        description="Convert a published AddressCLIP dataset (Pitts-IAL / SF-IAL) to the toolkit's dataset layout.",
    )
    p.add_argument("--annotations", nargs="+", required=True,
                   help="annotation folder(s) (all *.json inside) or files: {image path: [caption, verbose address, canonical address]}")
    p.add_argument("--coords", help="CSV of filename, UTM easting, northing (header optional); "
                   "omit it for SF-XL images whose names carry @easting@northing@zone@band@...")
    p.add_argument("--image-root", required=True, help="folder the annotation image paths are relative to")
    p.add_argument("--out", required=True, help="output dataset folder (replaced atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier dataset at --out (any other non-empty folder is refused)")
    p.add_argument("--city", required=True, help="city name written to every record, e.g. Pittsburgh")
    p.add_argument("--utm-epsg", type=int, required=True, help="EPSG code of the coordinates' UTM zone (Pittsburgh 32617, SF 32610)")
    p.add_argument("--images", choices=("symlink", "copy"), default="symlink",
                   help="images/ as a symlink to --image-root (default) or a copy of the kept images")
    p.add_argument("--verify-images", action="store_true", help="open every image and reject unreadable ones (slow)")
    p.add_argument("--split-map", type=_pair, nargs="*", default=[], metavar="FILE=SPLIT",
                   help="split of annotation files whose name does not say it, e.g. query.json=test")
    ns = p.parse_args(argv)
    try:
        cfg = IALConfig(city=ns.city, utm_epsg=ns.utm_epsg, images=ns.images, verify_images=ns.verify_images,
                        split_map=tuple(ns.split_map))
    except ValueError as e:
        p.error(str(e))
    # One rule for every command's --out (clip_stage.core.outdir); dataset_info.json marks datasets from before it.
    check_out_dir(ns.out, "load-ial", inputs=[ns.image_root, ns.coords, *ns.annotations], overwrite=ns.overwrite,
                  legacy=[INFO_FILE, "records.parquet", "sub_streets.geojson"])
    try:
        report = load_ial(ns.annotations, ns.coords, ns.image_root, ns.out, cfg)
    except IALFormatError as e:
        print(f"address-llava load-ial: error: {e}", file=sys.stderr)
        return 2
    print(f"load-ial: {report['kept']} images kept ({report['images_per_split']}), {report['rejected_total']} rejected "
          f"{report['rejected']}; {report['streets']} streets, {report['sub_streets']} sub-streets -> {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
