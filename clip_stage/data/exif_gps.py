"""GPS positions and orientation from the EXIF of phone photos: the GPS table of `build-dataset --images DIR`
when no `--gps` table is given.

    address-llava build-dataset --images phone_photos/ --network city.osm.pbf --out data/city

`scan_exif_gps(root)` walks the folder (sorted, so row numbers are stable), reads each image's EXIF GPS
IFD (tag 0x8825) with Pillow's `Image.getexif()` (header only, no pixels decoded) and returns the same
table `clip_stage.data.gps_table.read_gps_table` returns (row, image, lat, lon, caption, image_id) plus one `no_exif_gps`
reject per photo without a usable position. JPEG, PNG, WebP and TIFF are read by Pillow itself; HEIC/HEIF
(iPhone photos) when the optional `pillow-heif` plugin is installed (`register_heif()`); without it
a HEIC file is a `no_exif_gps` reject that says so.

`exif_orientation(im)` is the EXIF orientation tag (1 = upright): the builder stores rotated photos
upright (`ImageOps.exif_transpose`), so no later stage has to know about EXIF.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

GPS_IFD = 0x8825
ORIENTATION = 0x0112
# GPS IFD tags (EXIF 2.3, table 15)
GPS_LATITUDE_REF, GPS_LATITUDE, GPS_LONGITUDE_REF, GPS_LONGITUDE = 1, 2, 3, 4

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".heic", ".heif"})
HEIF_SUFFIXES = frozenset({".heic", ".heif"})


def register_heif() -> bool:
    """Registers pillow-heif's HEIC/HEIF opener with Pillow if the plugin is installed; True if it is."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _degrees(value) -> float:
    """EXIF degrees/minutes/seconds (three rationals, or one number) -> decimal degrees."""
    if isinstance(value, (tuple, list)):
        parts = [float(v) for v in value] + [0.0, 0.0]
        return parts[0] + parts[1] / 60.0 + parts[2] / 3600.0
    return float(value)


def gps_from_exif(exif) -> tuple[float, float] | None:
    """(lat, lon) in WGS84 degrees from a Pillow `Image.Exif`, or None without a usable GPS position."""
    gps = exif.get_ifd(GPS_IFD)
    if not gps or GPS_LATITUDE not in gps or GPS_LONGITUDE not in gps:
        return None
    try:
        lat, lon = _degrees(gps[GPS_LATITUDE]), _degrees(gps[GPS_LONGITUDE])
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if str(gps.get(GPS_LATITUDE_REF, "N")).strip().upper().startswith("S"):
        lat = -lat
    if str(gps.get(GPS_LONGITUDE_REF, "E")).strip().upper().startswith("W"):
        lon = -lon
    if not (math.isfinite(lat) and math.isfinite(lon)):
        return None
    return lat, lon


def exif_to_gps_ifd(lat: float, lon: float) -> dict:
    """The GPS IFD entries (tag -> value) of a position: what a camera writes (for tests and tools)."""
    from PIL.TiffImagePlugin import IFDRational

    def dms(v: float) -> tuple:
        v = abs(v)
        d = int(v)
        m = int((v - d) * 60)
        s = (v - d - m / 60) * 3600
        return (IFDRational(d, 1), IFDRational(m, 1), IFDRational(round(s * 10_000), 10_000))

    return {GPS_LATITUDE_REF: "N" if lat >= 0 else "S", GPS_LATITUDE: dms(lat),
            GPS_LONGITUDE_REF: "E" if lon >= 0 else "W", GPS_LONGITUDE: dms(lon)}


def exif_orientation(im) -> int:
    """The EXIF orientation tag of an opened image (1 = upright, also when absent or invalid)."""
    try:
        value = int(im.getexif().get(ORIENTATION, 1))
    except (TypeError, ValueError):
        return 1
    return value if 1 <= value <= 8 else 1


def read_photo_gps(path: str | os.PathLike) -> tuple[tuple[float, float] | None, str]:
    """((lat, lon) or None, why not) of one photo; reads the header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            pos = gps_from_exif(im.getexif())
    except UnidentifiedImageError:
        if Path(path).suffix.lower() in HEIF_SUFFIXES:
            return None, "HEIC/HEIF needs the optional pillow-heif plugin (pip install pillow-heif)"
        return None, "not an image Pillow can open"
    except (OSError, SyntaxError, ValueError) as e:  # broken headers / EXIF blocks
        return None, f"cannot read EXIF ({type(e).__name__}: {e})"
    return (pos, "") if pos is not None else (None, "no GPS position in the EXIF")


def scan_exif_gps(root: str | os.PathLike, workers: int = 4) -> tuple[pd.DataFrame, list[dict]]:
    """The GPS table of a photo folder from EXIF, and a `no_exif_gps` reject per photo without one.

    Every file with an image suffix under `root` (recursively, sorted; hidden folders skipped) is one
    row; `row` is its 1-based position in that order, `image` and `image_id` its path relative to root.
    """
    root = Path(root)
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath).relative_to(root)
        rels += [(base / f).as_posix() for f in sorted(filenames)
                 if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    rels.sort()
    if any(Path(r).suffix.lower() in HEIF_SUFFIXES for r in rels):
        register_heif()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        found = list(pool.map(lambda r: read_photo_gps(root / r), rels))
    records, rejects = [], []
    for rowno, (rel, (pos, why)) in enumerate(zip(rels, found), 1):
        if pos is None:
            rejects.append({"row": rowno, "field": "exif", "reason": "no_exif_gps", "image": rel, "detail": why})
            continue
        records.append({"row": rowno, "image": rel, "lat": repr(pos[0]), "lon": repr(pos[1]), "caption": "", "image_id": rel})
    cols = ["row", "image", "lat", "lon", "caption", "image_id"]
    df = pd.DataFrame.from_records(records, columns=cols)
    return df, rejects
