"""build-dataset's per-chunk step: check the rows of one chunk of the GPS table and geocode them (pure).

`check_chunk(table, geocoder)` checks each row (GPS present, numeric, in range; image path present and not
escaping the root) and reverse-geocodes the rest to a street (`clip_stage.data.geocode`). It is a pure
function of the chunk and the read-only geocoder, so an engine such as Dask, Ray or Spark could run it on
shards. REJECT_REASONS lists every reason a row can be dropped for, by the whole build.
"""

from __future__ import annotations

import math
import os
import posixpath
from dataclasses import dataclass

import numpy as np
import pandas as pd

from clip_stage.data.geocode import ReverseGeocoder

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


def _far_detail(dist: np.ndarray, radius_m: float):
    """The reject detail of a photo too far from any named street (inf: none within the search radius)."""
    return lambda i: (f"nearest named street {dist[i]:.1f} m away" if np.isfinite(dist[i])
                      else f"no named street within {radius_m:g} m")


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
    it on shards of a table (see docs/data.md "Beyond one machine"). The checks that need every row
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
            detail = _far_detail(dist, geocoder.config.search_radius_m) if reason == "far_from_street" else None
            reject(m, reason, "lat,lon", detail)

    ids = table["image_id"].map(_str_or_empty).to_numpy(dtype=object)
    ids = np.where(ids == "", rel, ids)
    caption = table["caption"].map(_str_or_empty).to_numpy(dtype=object)
    return ChunkResult(rows[alive], rel[alive], ids[alive], caption[alive], lat[alive], lon[alive], utm_x[alive],
                       utm_y[alive], street[alive], dist[alive], rejects)
