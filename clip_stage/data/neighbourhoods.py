"""Neighbourhoods of sub-streets (step 5 of the sub-street partition): a zone layer or OSM places.

`load_zones` reads a GeoJSON layer of neighbourhood polygons (ZoneFileError names a file that cannot be
read); without one, the smallest OSM area of the configured kinds containing a sub-street wins, else the
nearest place node within `neighbourhood_max_distance_m`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import shapely

from clip_stage.data.network import NetworkFileError, StreetNetwork, geojson_crs_transform, outside_lonlat
from clip_stage.data.substreet_types import SubStreetConfig


class ZoneFileError(ValueError):
    """A neighbourhood zone layer that cannot be read."""


def load_zones(path: str | Path, network: StreetNetwork, name_property: str = "name") -> tuple[list, list[str]]:
    """Polygons (UTM) and names of a zone layer: a GeoJSON FeatureCollection of (Multi)Polygons."""
    from shapely.geometry import shape

    path = Path(path)
    try:
        fc = json.loads(path.read_text(encoding="utf-8"))
        feats = fc["features"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ZoneFileError(f"{path}: cannot read as a GeoJSON FeatureCollection ({type(e).__name__}: {e})") from None
    try:  # a projected layer (GDAL and QGIS write the 2008 spec's crs member) is read in its own CRS
        to_wgs = geojson_crs_transform(fc.get("crs") if isinstance(fc, dict) else None, path)
    except NetworkFileError as e:
        raise ZoneFileError(str(e)) from None
    polys, names = [], []
    for i, f in enumerate(feats):
        try:
            geom = shape(f["geometry"])
        except Exception as e:  # shapely raises several types for malformed geometry
            raise ZoneFileError(f"{path}: feature {i}: bad geometry ({e})") from None
        if geom.geom_type not in ("Polygon", "MultiPolygon"):
            continue
        name = str((f.get("properties") or {}).get(name_property) or "")
        if not name:
            raise ZoneFileError(f"{path}: feature {i}: no {name_property!r} property")
        if to_wgs is not None:
            geom = shapely.transform(geom, to_wgs)
        if outside_lonlat(shapely.get_coordinates(geom)):
            raise ZoneFileError(f"{path}: feature {i} ({name!r}) has coordinates outside lon/lat range: a projected "
                                "layer must declare its CRS (GeoJSON 'crs' member) or be WGS84 lon/lat")
        polys.append(shapely.transform(geom, lambda xy: np.stack(network.to_utm(xy[:, 0], xy[:, 1]), axis=1)))
        names.append(name)
    if not polys:
        raise ZoneFileError(f"{path}: no Polygon/MultiPolygon features")
    return polys, names


def _in_polygons(points_xy: np.ndarray, polys: list, names: list[str], out: list[str]) -> None:
    """Fills empty entries of `out` with the name of the smallest polygon containing the point."""
    tree = shapely.STRtree(polys)
    pi, zi = tree.query(shapely.points(points_xy), predicate="within")
    area = shapely.area(np.array(polys, dtype=object))
    best: dict[int, int] = {}
    for p, z in zip(pi.tolist(), zi.tolist()):
        if not out[p] and (p not in best or area[z] < area[best[p]]):
            best[p] = z
    for p, z in best.items():
        out[p] = names[z]


def neighbourhoods(points_xy: np.ndarray, network: StreetNetwork, cfg: SubStreetConfig, zones=None) -> list[str]:
    """Zone layer first, then the network's place / boundary areas, then the nearest place node."""
    n = len(points_xy)
    out = [""] * n
    if n == 0:
        return out
    if zones is not None:
        _in_polygons(points_xy, *zones, out)
    kinds = set(cfg.kinds)
    areas = [a for a in network.areas if a.kind in kinds]
    if areas:
        to_utm = lambda xy: np.stack(network.to_utm(xy[:, 0], xy[:, 1]), axis=1)  # noqa: E731
        _in_polygons(points_xy, [shapely.transform(a.polygon, to_utm) for a in areas], [a.name for a in areas], out)
    places = [p for p in network.places if p.kind in kinds]
    if places:
        px, py = network.to_utm([p.lon for p in places], [p.lat for p in places])
        d = np.hypot(points_xy[:, :1] - px[None, :], points_xy[:, 1:2] - py[None, :])
        j = d.argmin(axis=1)
        for i in range(n):
            if not out[i] and d[i, j[i]] <= cfg.neighbourhood_max_distance_m:
                out[i] = places[j[i]].name
    return out
