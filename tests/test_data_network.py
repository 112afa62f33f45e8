"""Street-network loading: OSM XML / PBF, GraphML (osmnx style), GeoJSON, the Helsinki extract, bad files.

Also home of the tiny hand-made "toy town" network used by the geocoder, sub-street and builder tests:
local metres around central Helsinki (EPSG:32635), written as .osm XML, GeoJSON or GraphML.

    Main Street      y = 0,   x 0..600 (dead ends at both ends)
    First Avenue     x = 100, y -200..200
    Second Avenue    x = 300, y -200..200
    Close Lane       x = 315, y 0..150   (15 m from Second Avenue: a too-close intersection)
    Third Avenue     x = 500, y -200..200
    Garden Path      y = 40,  x 0..600 (highway=footway: not a street by default)
"""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from pyproj import Transformer

from clip_stage.data.network import (
    DEFAULT_HIGHWAYS,
    NetworkFileError,
    StreetNetwork,
    Way,
    helsinki_pbf_path,
    load_street_network,
    resolve_city,
    utm_epsg_for,
)

ORIGIN = (385000.0, 6672000.0)
EPSG = 32635
_TO_WGS = Transformer.from_crs(EPSG, 4326, always_xy=True)

TOY_WAYS = [
    ("Main Street", "residential", [(0, 0), (100, 0), (300, 0), (315, 0), (500, 0), (600, 0)]),
    ("First Avenue", "secondary", [(100, -200), (100, 0), (100, 200)]),
    ("Second Avenue", "tertiary", [(300, -200), (300, 0), (300, 200)]),
    ("Close Lane", "residential", [(315, 0), (315, 150)]),
    ("Third Avenue", "primary", [(500, -200), (500, 0), (500, 200)]),
    ("Garden Path", "footway", [(0, 40), (600, 40)]),
]
TOY_PLACES = [("Westside", "suburb", 100, 100), ("Eastside", "suburb", 500, 100), ("Toytown", "city", 300, 300)]


def lonlat(x, y):
    """Local toy-town metres -> (lon, lat)."""
    lon, lat = _TO_WGS.transform(ORIGIN[0] + np.asarray(x, dtype=float), ORIGIN[1] + np.asarray(y, dtype=float))
    return lon, lat


def utm(x, y):
    return ORIGIN[0] + np.asarray(x, dtype=float), ORIGIN[1] + np.asarray(y, dtype=float)


HARBOUR = [(450, -50), (650, -50), (650, 50), (450, 50), (450, -50)]  # a place=neighbourhood polygon


def write_osm(path: Path, ways=TOY_WAYS, places=TOY_PLACES, areas=()) -> Path:
    """OSM XML with shared nodes where ways meet (as in real OSM data).

    `areas`: (name, {tag: value}, closed ring of points) written as closed ways (OSM areas)."""
    node_ids: dict[tuple, int] = {}
    nodes, way_xml = [], []
    items = [(name, {"highway": hw}, pts) for name, hw, pts in ways] + [(n, dict(t), pts) for n, t, pts in areas]
    for name, tags, pts in items:
        refs = []
        for p in pts:
            if p not in node_ids:
                node_ids[p] = len(node_ids) + 1
                lon, lat = lonlat(*p)
                nodes.append(f'  <node id="{node_ids[p]}" version="1" lat="{lat:.8f}" lon="{lon:.8f}"/>')
            refs.append(node_ids[p])
        wid = 1000 + len(way_xml)
        nds = "".join(f'<nd ref="{r}"/>' for r in refs)
        tag_xml = "".join(f'<tag k="{k}" v="{v}"/>' for k, v in {**tags, "name": name}.items())
        way_xml.append(f'  <way id="{wid}" version="1">{nds}{tag_xml}</way>')
    for k, (name, kind, x, y) in enumerate(places):
        lon, lat = lonlat(x, y)
        nodes.append(
            f'  <node id="{9000 + k}" version="1" lat="{lat:.8f}" lon="{lon:.8f}">'
            f'<tag k="place" v="{kind}"/><tag k="name" v="{name}"/></node>'
        )
    # an unnamed road must be ignored
    lon0, lat0 = lonlat(0, -100)
    lon1, lat1 = lonlat(50, -100)
    nodes += [f'  <node id="8001" version="1" lat="{lat0:.8f}" lon="{lon0:.8f}"/>',
              f'  <node id="8002" version="1" lat="{lat1:.8f}" lon="{lon1:.8f}"/>']
    way_xml.append('  <way id="7001" version="1"><nd ref="8001"/><nd ref="8002"/><tag k="highway" v="residential"/></way>')
    path.write_text('<?xml version="1.0" encoding="UTF-8"?>\n<osm version="0.6" generator="test">\n'
                    + "\n".join(nodes + way_xml) + "\n</osm>\n", encoding="utf-8")
    return path


def geojson_features(ways, places, to_coords=lonlat) -> list[dict]:
    """Features of the toy ways (LineStrings) and places (Points), local metres mapped by `to_coords`."""
    feats = []
    for name, hw, pts in ways:
        a, b = to_coords([p[0] for p in pts], [p[1] for p in pts])
        feats.append({"type": "Feature", "properties": {"name": name, "highway": hw},
                      "geometry": {"type": "LineString", "coordinates": np.stack([a, b], 1).tolist()}})
    for name, kind, x, y in places:
        a, b = to_coords(x, y)
        feats.append({"type": "Feature", "properties": {"name": name, "place": kind},
                      "geometry": {"type": "Point", "coordinates": [float(a), float(b)]}})
    return feats


def write_geojson(path: Path, ways=TOY_WAYS, places=TOY_PLACES) -> Path:
    feats = geojson_features(ways, places)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}), encoding="utf-8")
    return path


def write_graphml(path: Path, ways=TOY_WAYS) -> Path:
    """osmnx-style GraphML: node x/y, edges with name/highway and (on multi-vertex edges) WKT geometry,
    both directions of every street, one name stored as a list repr as osmnx does after simplification."""
    g = nx.MultiDiGraph()
    ids: dict[tuple, str] = {}

    def node(p):
        if p not in ids:
            ids[p] = str(len(ids))
            lon, lat = lonlat(*p)
            g.add_node(ids[p], x=float(lon), y=float(lat))
        return ids[p]

    for k, (name, hw, pts) in enumerate(ways):
        u, v = node(pts[0]), node(pts[-1])
        lon, lat = lonlat([p[0] for p in pts], [p[1] for p in pts])
        attrs = {"name": str([name, "Alias"]) if k == 1 else name, "highway": hw}
        if len(pts) > 2:
            attrs["geometry"] = "LINESTRING (" + ", ".join(f"{a:.8f} {b:.8f}" for a, b in zip(lon, lat)) + ")"
        g.add_edge(u, v, **attrs)
        rev = dict(attrs)
        if "geometry" in rev:
            rev["geometry"] = "LINESTRING (" + ", ".join(f"{a:.8f} {b:.8f}" for a, b in zip(lon[::-1], lat[::-1])) + ")"
        g.add_edge(v, u, **rev)
    nx.write_graphml(g, path)
    return path


@pytest.fixture
def toy_osm(tmp_path):
    return write_osm(tmp_path / "toy.osm")


# --------------------------------------------------------------------------------------------------


def test_osm_xml_named_streets_only_and_places(toy_osm):
    net = load_street_network(toy_osm)
    assert net.street_names() == sorted(["Main Street", "First Avenue", "Second Avenue", "Close Lane", "Third Avenue"])
    assert {p.name: p.kind for p in net.places} == {"Westside": "suburb", "Eastside": "suburb", "Toytown": "city"}
    assert net.city_name() == "Toytown"
    assert net.utm_epsg == EPSG
    main = next(w for w in net.ways if w.name == "Main Street")
    assert main.highway == "residential" and main.coords.shape == (6, 2)
    x, y = net.to_utm(main.coords[:, 0], main.coords[:, 1])
    np.testing.assert_allclose(x - ORIGIN[0], [0, 100, 300, 315, 500, 600], atol=0.01)
    np.testing.assert_allclose(y - ORIGIN[1], 0, atol=0.01)
    lon, lat = net.to_wgs84(x, y)
    np.testing.assert_allclose(np.stack([lon, lat], 1), main.coords, atol=1e-9)


def test_a_highway_mapped_as_an_area_is_not_a_street_line(tmp_path):
    # a pedestrian street mapped as its outline (area=yes): its loop would be read as a 4x longer street
    square = [(100, 20), (300, 20), (300, 60), (100, 60), (100, 20)]
    net = load_street_network(write_osm(tmp_path / "plaza.osm", areas=[
        ("Market Walk", {"highway": "pedestrian", "area": "yes"}, square)]))
    assert "Market Walk" not in net.street_names()
    linear = load_street_network(write_osm(tmp_path / "walk.osm", areas=[
        ("Market Walk", {"highway": "pedestrian"}, square[:2])]))
    assert "Market Walk" in linear.street_names()
    # its tram/service way (a class not kept) running along the surface is its line, with the area's class
    tram = [*TOY_WAYS, ("Market Walk", "service", [(100, 40), (200, 40), (300, 40)]),
            ("Back Lane", "service", [(100, 90), (300, 90)])]
    both = load_street_network(write_osm(tmp_path / "tram.osm", tram, areas=[
        ("Market Walk", {"highway": "pedestrian", "area": "yes"}, square)]))
    walk = [w for w in both.ways if w.name == "Market Walk"]
    assert [(w.highway, len(w.coords)) for w in walk] == [("pedestrian", 3)] and "Back Lane" not in both.street_names()


def test_a_city_across_the_antimeridian_gets_its_own_utm_zone():
    ways = [Way("Harbour Road", "residential", np.array([[179.98, -16.8], [-179.99, -16.8]]))]
    assert StreetNetwork.from_ways(ways).utm_epsg == utm_epsg_for(179.995, -16.8) == 32760


def test_place_and_boundary_areas(tmp_path):
    ring = [(0, -150), (200, -150), (200, -100), (0, -100), (0, -150)]
    net = load_street_network(write_osm(tmp_path / "areas.osm", areas=[
        ("Harbour", {"place": "neighbourhood"}, HARBOUR),
        ("Ward 7", {"boundary": "administrative", "admin_level": "10"}, ring),
        ("Block 9", {"place": "city_block"}, ring),  # not a neighbourhood-like area
    ]))
    assert sorted((a.name, a.kind) for a in net.areas) == [("Harbour", "neighbourhood"), ("Ward 7", "admin10")]
    harbour = next(a for a in net.areas if a.name == "Harbour")
    from shapely.geometry import Point

    assert harbour.polygon.contains(Point(*lonlat(550, 0))) and not harbour.polygon.contains(Point(*lonlat(300, 0)))
    assert "Harbour" not in net.street_names()  # an area is not a street


def test_highway_classes_are_configurable(toy_osm):
    assert "footway" not in DEFAULT_HIGHWAYS
    with_paths = load_street_network(toy_osm, highway_classes=DEFAULT_HIGHWAYS | {"footway"})
    assert "Garden Path" in with_paths.street_names()
    only_primary = load_street_network(toy_osm, highway_classes={"primary"})
    assert only_primary.street_names() == ["Third Avenue"]
    assert "Garden Path" in load_street_network(toy_osm, highway_classes=None).street_names()


def test_geojson_and_graphml_give_the_same_streets(tmp_path, toy_osm):
    osm = load_street_network(toy_osm)
    gj = load_street_network(write_geojson(tmp_path / "toy.geojson"))
    gm = load_street_network(write_graphml(tmp_path / "toy.graphml"))
    assert gj.street_names() == osm.street_names() == gm.street_names()
    assert gj.city_name() == "Toytown" and gm.places == []
    # osmnx stores both directions: one way per street is kept; the list-valued name keeps its first name
    assert sorted(w.name for w in gm.ways) == sorted(w.name for w in osm.ways)
    first = next(w for w in gm.ways if w.name == "First Avenue")
    assert first.coords.shape == (3, 2)  # the WKT geometry, not just the end nodes
    close = next(w for w in gm.ways if w.name == "Close Lane")
    assert close.coords.shape == (2, 2)  # no geometry attribute: straight between node x/y
    # ... and is reported: the build report warns that such edges are labelled by one name along their length
    assert len(gm.notes) == 1 and "1 edges carry several street names" in gm.notes[0] and osm.notes == gj.notes == []


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("broken.osm.pbf", b"\x00\x01not a pbf at all" * 10, "cannot read as OSM"),
        ("broken.osm", b"<osm><node id=", "cannot read as OSM"),
        ("broken.geojson", b"{not json", "cannot read as GeoJSON"),
        ("notfc.geojson", b'{"type": "Point"}', "not a GeoJSON FeatureCollection"),
        ("broken.graphml", b"<graphml><graph", "cannot read as GraphML"),
        ("streets.shp", b"whatever", "unknown street-network format"),
        ("empty.geojson", b'{"type": "FeatureCollection", "features": []}', "no named road ways"),
        ("projected.geojson",
         b'{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"name":"A"},'
         b'"geometry":{"type":"LineString","coordinates":[[385000,6672000],[385100,6672000]]}}]}',
         "outside lon/lat range"),
    ],
)
def test_bad_network_file_is_a_clear_error_naming_it(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(NetworkFileError, match=message) as e:
        load_street_network(path)
    assert str(path) in str(e.value)


def test_missing_network_file(tmp_path):
    with pytest.raises(NetworkFileError, match="not found") as e:
        load_street_network(tmp_path / "nope.osm.pbf")
    assert "nope.osm.pbf" in str(e.value)


def test_from_ways_requires_ways():
    with pytest.raises(NetworkFileError):
        StreetNetwork.from_ways([])
    net = StreetNetwork.from_ways([Way("A", "", np.array([[-122.4, 37.7], [-122.39, 37.7]]))])
    assert net.utm_epsg == 32610  # San Francisco: UTM 10N


def test_helsinki_extract():
    path = helsinki_pbf_path()
    assert path.name == "Helsinki.osm.pbf" and path.is_file()
    net = load_street_network(path)
    names = net.street_names()
    assert len(names) > 50
    assert {"Mannerheimintie", "Aleksanterinkatu", "Bulevardi"} <= set(names)
    assert net.city_name() == "Helsinki"
    assert net.utm_epsg == 32635
    assert all(w.highway in DEFAULT_HIGHWAYS for w in net.ways)
    assert any(p.kind == "suburb" for p in net.places)
    lon0, lat0, lon1, lat1 = net.bounds()
    assert 24.9 < lon0 < lon1 < 25.0 and 60.1 < lat0 < lat1 < 60.2


# --------------------------------------------------------------------------------------------------
# projected inputs

UTM35 = "+proj=utm +zone=35 +ellps=WGS84 +datum=WGS84 +units=m +no_defs +type=crs"


def write_projected_graphml(path: Path, crs: str | None, *, project=None, with_lonlat=True, ways=TOY_WAYS) -> Path:
    """An osmnx GraphML as `project_graph` saves it: node x/y and edge WKT geometry in a projected CRS,
    node lon/lat kept, the CRS as the graph attribute `crs` (left out when `crs` is None).

    `project` maps local toy metres to the file's x/y (default: UTM 35N, EPSG:32635)."""
    project = project or (lambda x, y: utm(x, y))
    g = nx.MultiDiGraph(**({"crs": crs} if crs else {}))
    ids: dict[tuple, str] = {}
    for name, hw, pts in ways:
        for p in (pts[0], pts[-1]):
            if p not in ids:
                ids[p] = str(len(ids))
                x, y = project(*p)
                lon, lat = lonlat(*p)
                attrs = {"x": float(x), "y": float(y)}
                if with_lonlat:
                    attrs |= {"lon": float(lon), "lat": float(lat)}
                g.add_node(ids[p], **attrs)
        xs, ys = project([p[0] for p in pts], [p[1] for p in pts])
        attrs = {"name": name, "highway": hw}
        if len(pts) > 2:
            attrs["geometry"] = "LINESTRING (" + ", ".join(f"{a:.3f} {b:.3f}" for a, b in zip(xs, ys)) + ")"
        g.add_edge(ids[pts[0]], ids[pts[-1]], **attrs)
    nx.write_graphml(g, path)
    return path


def _same_ways(net, ref, atol=1e-7):
    got = sorted((w.name, w.coords.round(6).tolist()) for w in net.ways)
    assert [n for n, _ in got] == sorted(w.name for w in ref.ways)
    for w in ref.ways:
        match = [x for x in net.ways if x.name == w.name and len(x.coords) == len(w.coords)]
        assert match, w.name
        np.testing.assert_allclose(match[0].coords, w.coords, atol=atol)


@pytest.mark.parametrize("crs", [UTM35, "epsg:32635", None])
def test_projected_graphml_is_read_through_its_crs_or_node_lonlat(tmp_path, toy_osm, crs):
    """osmnx after project_graph: the declared crs; without one, node lon/lat identify the UTM zone."""
    net = load_street_network(write_projected_graphml(tmp_path / "proj.graphml", crs))
    ref = load_street_network(toy_osm)
    _same_ways(net, ref)
    assert net.utm_epsg == EPSG


def test_projected_graphml_in_another_crs_without_declaration(tmp_path):
    """Node lon/lat beside x/y of an undeclared non-UTM projection: straight edges are read from lon/lat,
    an edge with projected geometry is a one-line error; without lon/lat the file is refused."""
    to_merc = Transformer.from_crs(4326, 3857, always_xy=True)  # web Mercator, not a UTM zone

    def merc(x, y):
        return to_merc.transform(*lonlat(x, y))

    straight = [(n, hw, [pts[0], pts[-1]]) for n, hw, pts in TOY_WAYS]
    net = load_street_network(write_projected_graphml(tmp_path / "s.graphml", None, project=merc, ways=straight))
    main = next(w for w in net.ways if w.name == "Main Street")
    np.testing.assert_allclose(main.coords, np.stack(lonlat([0, 600], [0, 0]), 1), atol=1e-7)
    path = write_projected_graphml(tmp_path / "g.graphml", None, project=merc)
    with pytest.raises(NetworkFileError, match="declares no crs") as e:
        load_street_network(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    path = write_projected_graphml(tmp_path / "bare.graphml", None, with_lonlat=False)
    with pytest.raises(NetworkFileError, match="must declare its CRS"):
        load_street_network(path)
    path = write_projected_graphml(tmp_path / "bad.graphml", "epsg:999999")
    with pytest.raises(NetworkFileError, match="not a coordinate reference system"):
        load_street_network(path)


def _projected_geojson(path: Path, crs_member) -> Path:
    feats = geojson_features(TOY_WAYS, TOY_PLACES, to_coords=utm)
    x, y = utm([p[0] for p in HARBOUR], [p[1] for p in HARBOUR])
    feats.append({"type": "Feature", "properties": {"name": "Harbour", "place": "neighbourhood"},
                  "geometry": {"type": "Polygon", "coordinates": [np.stack([x, y], 1).tolist()]}})
    path.write_text(json.dumps({"type": "FeatureCollection", "crs": crs_member, "features": feats}), encoding="utf-8")
    return path


@pytest.mark.parametrize("member", [
    {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32635"}},
    {"type": "name", "properties": {"name": "EPSG:32635"}},
    {"type": "EPSG", "properties": {"code": 32635}},
])
def test_projected_geojson_with_a_crs_member(tmp_path, toy_osm, member):
    net = load_street_network(_projected_geojson(tmp_path / "proj.geojson", member))
    _same_ways(net, load_street_network(toy_osm))
    west = next(p for p in net.places if p.name == "Westside")
    np.testing.assert_allclose([west.lon, west.lat], lonlat(100, 100), atol=1e-7)
    from shapely.geometry import Point

    harbour = next(a for a in net.areas if a.name == "Harbour")
    assert harbour.polygon.contains(Point(*lonlat(550, 0))) and not harbour.polygon.contains(Point(*lonlat(300, 0)))


def test_geojson_crs_member_errors(tmp_path):
    path = _projected_geojson(tmp_path / "odd.geojson", {"type": "link", "properties": {"href": "x.prj"}})
    with pytest.raises(NetworkFileError, match="unsupported 'crs' member") as e:
        load_street_network(path)
    assert str(path) in str(e.value)
    # WGS84 declared but projected numbers: still the out-of-range error
    path = _projected_geojson(tmp_path / "lying.geojson", {"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}})
    with pytest.raises(NetworkFileError, match="outside lon/lat range"):
        load_street_network(path)


# --------------------------------------------------------------------------------------------------
# city fallback

_CITY_RING = [(-500, -500), (1100, -500), (1100, 500), (-500, 500), (-500, -500)]
_REGION_RING = [(-900, -900), (1500, -900), (1500, 900), (-900, 900), (-900, -900)]
_FAR_RING = [(5000, 5000), (6000, 5000), (6000, 6000), (5000, 6000), (5000, 5000)]


def test_resolve_city_order(tmp_path):
    net = load_street_network(write_osm(tmp_path / "a.osm"))
    assert resolve_city(net, " Flagtown ") == ("Flagtown", "flag")
    assert resolve_city(net, None) == ("Toytown", "osm_place")
    assert resolve_city(net, "") == ("Toytown", "osm_place")
    suburbs = [p for p in TOY_PLACES if p[1] != "city"]
    # no place=city node: a town-or-city place area containing the centre
    net = load_street_network(write_osm(tmp_path / "b.osm", places=suburbs, areas=[("Areaville", {"place": "town"}, _CITY_RING)]))
    assert resolve_city(net, None) == ("Areaville", "osm_place")
    # no place at all: the smallest municipality-level boundary containing the centre
    admin = [
        ("Region", {"boundary": "administrative", "admin_level": "6"}, _REGION_RING),
        ("Municipality", {"boundary": "administrative", "admin_level": "8"}, _CITY_RING),
        ("Ward", {"boundary": "administrative", "admin_level": "10"}, _CITY_RING),  # a part, never the city
        ("Elsewhere", {"boundary": "administrative", "admin_level": "8"}, _FAR_RING),
    ]
    net = load_street_network(write_osm(tmp_path / "c.osm", places=suburbs, areas=admin))
    assert resolve_city(net, None) == ("Municipality", "admin_boundary")
    net = load_street_network(write_osm(tmp_path / "d.osm", places=suburbs, areas=admin[2:]))
    assert resolve_city(net, None) == ("", "none")
