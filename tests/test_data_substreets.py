"""Sub-street partition: intersections split streets, the close-intersection drop, the merge rule, labels."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from shapely.geometry import LineString, Point

from clip_stage.data.geocode import ReverseGeocoder
from clip_stage.data.network import helsinki_pbf_path, load_street_network
from clip_stage.core.schema import address_columns
from clip_stage.data.neighbourhoods import ZoneFileError, load_zones
from clip_stage.data.street_pieces import split_streets
from clip_stage.data.substreet_types import SubStreetConfig
from clip_stage.data.substreets import partition_sub_streets, side_by_side, sub_streets_geojson
from tests.test_data_network import HARBOUR, ORIGIN, lonlat, utm, write_geojson, write_osm

MAIN_X = {0: [20, 40, 60, 80, 90], 1: [150, 170, 200, 230, 250], 2: [350, 380, 400, 420, 450], 3: [520, 540, 560, 570, 580]}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return load_street_network(write_osm(tmp_path_factory.mktemp("net") / "toy.osm"))


def _main_points(per_piece: dict[int, list[float]]):
    xs = [x for k in sorted(per_piece) for x in per_piece[k]]
    ys = [(-1) ** i * 3.0 for i in range(len(xs))]
    x, y = utm(xs, ys)
    return x, y, np.array(["Main Street"] * len(xs), dtype=object)


def _pieces(pieces, street):
    return sorted((round(p.geom.length, 1), p.start, p.end) for p in pieces if p.street == street)


def test_intersections_split_streets_and_close_ones_are_dropped(toy):
    pieces, stats = split_streets(toy, SubStreetConfig())
    # Second Avenue (x=300) and Close Lane (x=315) are 15 m apart: one split point at their mean
    assert _pieces(pieces, "Main Street") == sorted([
        (100, "", "First Avenue"), (207.5, "First Avenue", "Second Avenue"),
        (192.5, "Second Avenue", "Third Avenue"), (100, "Third Avenue", ""),
    ])
    assert stats["dropped_intersections"] == 1
    # a crossing at the very end of a street is that end's cross street, not a split
    assert _pieces(pieces, "Close Lane") == [(150, "Main Street", "")]
    assert _pieces(pieces, "First Avenue") == [(200, "", "Main Street"), (200, "Main Street", "")]

    fine, stats = split_streets(toy, SubStreetConfig(min_intersection_gap_m=5))
    assert stats["dropped_intersections"] == 0
    assert (15, "Second Avenue", "Close Lane") in _pieces(fine, "Main Street")
    assert len(_pieces(fine, "Main Street")) == 5


def test_points_get_the_right_sub_street_and_labels(toy):
    x, y, streets = _main_points(MAIN_X)
    part = partition_sub_streets(toy, x, y, streets, SubStreetConfig(), city="Toytown")
    subs = part.sub_streets
    assert [s.sub_street for s in subs] == [f"Main Street/{k}" for k in range(4)]  # west to east
    assert [s.cross_streets for s in subs] == [
        ("First Avenue",), ("First Avenue", "Second Avenue"), ("Second Avenue", "Third Avenue"), ("Third Avenue",),
    ]
    assert [address_columns(s.address())["address_full"] for s in subs] == [
        "Main Street near First Avenue, Westside, Toytown",
        "Main Street between First Avenue and Second Avenue, Westside, Toytown",
        "Main Street between Second Avenue and Third Avenue, Eastside, Toytown",
        "Main Street near Third Avenue, Eastside, Toytown",
    ]
    assert list(part.point_sub) == [k for k in range(4) for _ in MAIN_X[k]]
    assert [s.n_points for s in subs] == [5, 5, 5, 5]


def test_small_sub_streets_merge_into_a_neighbour(toy):
    pts = {**MAIN_X, 0: [30, 60]}  # only 2 images west of First Avenue
    x, y, streets = _main_points(pts)
    part = partition_sub_streets(toy, x, y, streets, SubStreetConfig(min_points=5))
    subs = part.sub_streets
    assert len(subs) == 3 and part.stats["small_merges"] == 1
    # merged across First Avenue: the dead end + the block up to Second Avenue
    assert subs[0].cross_streets == ("Second Avenue",) and subs[0].n_points == 7
    assert subs[0].geometry.length == pytest.approx(100 + 207.5, abs=0.1)
    assert list(part.point_sub) == [0] * 7 + [1] * 5 + [2] * 5
    assert sum(s.n_points for s in subs) == len(x)
    # with min_points=1 nothing is merged
    part1 = partition_sub_streets(toy, x, y, streets, SubStreetConfig(min_points=1))
    assert len(part1.sub_streets) == 4 and part1.stats["small_merges"] == 0


def test_streets_without_points_and_rejected_points(toy):
    x, y, streets = _main_points(MAIN_X)
    streets[0] = ""  # a rejected point: not assigned
    part = partition_sub_streets(toy, x, y, streets, SubStreetConfig(min_points=1))
    assert part.point_sub[0] == -1 and (part.point_sub[1:] >= 0).all()
    assert {s.street for s in part.sub_streets} == {"Main Street"}  # streets with no image are no class


def test_dual_carriageway_and_same_labels_make_one_sub_street(tmp_path):
    ways = [
        ("Boulevard", "primary", [(0, 0), (400, 0)]),
        ("Boulevard", "primary", [(0, 10), (400, 10)]),
        ("West Road", "residential", [(50, -100), (50, 100)]),
        ("North Road", "residential", [(200, -100), (200, 100)]),
        ("East Road", "residential", [(350, -100), (350, 100)]),
    ]
    net = load_street_network(write_geojson(tmp_path / "dual.geojson", ways, []))
    xs = [20, 30, 100, 120, 150, 170, 250, 270, 300, 320, 380, 390]
    ys = [0, 10] * 6
    x, y = utm(xs, ys)
    part = partition_sub_streets(net, x, y, np.array(["Boulevard"] * 12, dtype=object), SubStreetConfig(min_points=1))
    subs = part.sub_streets
    assert [s.cross_streets for s in subs] == [
        ("West Road",), ("West Road", "North Road"), ("North Road", "East Road"), ("East Road",),
    ]
    assert [s.n_points for s in subs] == [2, 4, 4, 2]  # both carriageways' images in one sub-street
    assert subs[1].geometry.geom_type == "MultiLineString" and len(subs[1].geometry.geoms) == 2
    # North Road crosses only Boulevard: both sides read "North Road near Boulevard" -> one class
    xn, yn = utm([200, 200, 200, 200], [-60, -40, 40, 60])
    part = partition_sub_streets(net, xn, yn, np.array(["North Road"] * 4, dtype=object), SubStreetConfig(min_points=1))
    assert [(s.sub_street, s.cross_streets, s.n_points) for s in part.sub_streets] == [("North Road/0", ("Boulevard",), 4)]


def test_neighbourhood_from_a_zone_layer(toy, tmp_path):
    lon, lat = lonlat([-50, 300, 300, -50, -50], [-300, -300, 300, 300, -300])
    zones = {"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"name": "Old Town"},
        "geometry": {"type": "Polygon", "coordinates": [np.stack([lon, lat], 1).tolist()]}}]}
    path = tmp_path / "zones.geojson"
    path.write_text(json.dumps(zones), encoding="utf-8")
    x, y, streets = _main_points(MAIN_X)
    part = partition_sub_streets(toy, x, y, streets, SubStreetConfig(), zones=load_zones(path, toy))
    # inside the polygon: its name; outside: the nearest OSM place node
    assert [s.neighbourhood for s in part.sub_streets] == ["Old Town", "Old Town", "Eastside", "Eastside"]


def test_a_projected_zone_layer_is_read_through_its_crs_member(toy, tmp_path):
    x, y = utm([-50, 300, 300, -50, -50], [-300, -300, 300, 300, -300])
    zones = {"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "EPSG:32635"}},
             "features": [{"type": "Feature", "properties": {"name": "Old Town"},
                           "geometry": {"type": "Polygon", "coordinates": [np.stack([x, y], 1).tolist()]}}]}
    path = tmp_path / "zones.geojson"
    path.write_text(json.dumps(zones), encoding="utf-8")
    polys, names = load_zones(path, toy)
    assert names == ["Old Town"] and polys[0].contains(Point(*utm(100, 0)))
    del zones["crs"]  # projected numbers without a declaration: an error naming the file, not a silent miss
    path.write_text(json.dumps(zones), encoding="utf-8")
    with pytest.raises(ZoneFileError, match="outside lon/lat range") as e:
        load_zones(path, toy)
    assert str(path) in str(e.value)


def test_neighbourhood_from_osm_place_areas(tmp_path):
    net = load_street_network(write_osm(tmp_path / "harbour.osm", areas=[("Harbour", {"place": "neighbourhood"}, HARBOUR)]))
    x, y, streets = _main_points(MAIN_X)
    part = partition_sub_streets(net, x, y, streets, SubStreetConfig())
    # Main Street/3 (x 500..600) lies in the Harbour polygon, whose node-less area beats the nearest node
    assert [s.neighbourhood for s in part.sub_streets] == ["Westside", "Westside", "Eastside", "Harbour"]
    part = partition_sub_streets(net, x, y, streets, SubStreetConfig(neighbourhood_kinds="suburb"))
    assert part.sub_streets[3].neighbourhood == "Eastside"


def test_geojson_output_is_wgs84_with_address_properties(toy):
    x, y, streets = _main_points(MAIN_X)
    part = partition_sub_streets(toy, x, y, streets, SubStreetConfig(), city="Toytown")
    fc = sub_streets_geojson(part, toy)
    assert len(fc["features"]) == 4
    f = fc["features"][1]
    assert f["properties"]["sub_street"] == "Main Street/1"
    assert f["properties"]["address_sub_street"] == "Main Street between First Avenue and Second Avenue"
    coords = np.array(f["geometry"]["coordinates"])
    lon, lat = lonlat([100, 307.5], [0, 0])
    np.testing.assert_allclose(coords[[0, -1]], np.stack([lon, lat], 1), atol=1e-6)


def test_helsinki_partition_is_consistent():
    net = load_street_network(helsinki_pbf_path())
    geocoder = ReverseGeocoder(net)
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for line in geocoder.lines_utm:
        ls = LineString(line)
        for d in np.arange(5, ls.length, 12.0):
            p = ls.interpolate(d)
            xs.append(p.x + rng.normal(0, 3))
            ys.append(p.y + rng.normal(0, 3))
    x, y = np.array(xs), np.array(ys)
    geo = geocoder.geocode_xy(x, y)
    cfg = SubStreetConfig()
    part = partition_sub_streets(net, x, y, geo.street, cfg, city="Helsinki")
    subs = part.sub_streets
    assert 100 < len(subs) < 300
    assert ((part.point_sub >= 0) == geo.ok).all()  # every geocoded point has a sub-street
    ids = [s.sub_street for s in subs]
    assert len(set(ids)) == len(ids)
    labels = [address_columns(s.address())["address_full"] for s in subs]
    assert len(set(labels)) == len(labels)  # no two classes with the same address text
    per_street = Counter(s.street for s in subs)
    for s in subs:
        assert s.street not in s.cross_streets and 0 <= len(s.cross_streets) <= 2
        assert s.sub_street.startswith(s.street + "/")
        assert s.n_points >= cfg.min_points or per_street[s.street] == 1
        assert s.neighbourhood and s.city == "Helsinki"
    # every point's street is its sub-street's street
    names = np.array([s.street for s in subs], dtype=object)
    ok = part.point_sub >= 0
    assert (names[part.point_sub[ok]] == geo.street[ok]).all()
    assert np.bincount(part.point_sub[ok], minlength=len(subs)).tolist() == [s.n_points for s in subs]
    assert sum(len(s.cross_streets) == 2 for s in subs) > len(subs) / 2
    # dual carriageways (Mannerheimintie, Mikonkatu, Kaisaniemenkatu...): one sub-street per block;
    # measured: 8 pairs side by side before parallel ways shared their split points, 0 after
    assert side_by_side(subs) == []
    assert side_by_side(partition_sub_streets(net, x, y, geo.street, SubStreetConfig(parallel_merge_m=0)).sub_streets)


# A dual carriageway, y = 0 (southbound... any direction) and y = 14, x 0..600 (the north one to 640),
# with crossings that reach only one side, two offset T-junctions and a dead end at the east.
DUAL_WAYS = [
    ("Avenue", "primary", [(0, 0), (600, 0)]),
    ("Avenue", "primary", [(0, 14), (640, 14)]),
    ("West Road", "residential", [(100, -100), (100, 120)]),  # crosses both
    ("North Lane", "residential", [(250, 14), (250, 120)]),  # reaches the north side only
    ("South Lane", "residential", [(260, -100), (260, 0)]),  # the south side only, 10 m further east
    ("Mid Street", "residential", [(400, -100), (400, 0)]),  # the south side only
    ("East Road", "residential", [(500, -100), (500, 120)]),  # crosses both; then a dead end
]
BLOCKS = [(20, 80), (150, 220), (300, 370), (430, 470), (540, 590)]


def test_dual_carriageway_with_offset_crossings_is_one_sequence(tmp_path):
    net = load_street_network(write_geojson(tmp_path / "dual.geojson", DUAL_WAYS, []))
    xs = [x for a, b in BLOCKS for x in (a, b, a, b)]
    ys = [y for _ in BLOCKS for y in (1, 1, 13, 13)]  # the same block, each carriageway
    x, y = utm(xs, ys)
    streets = np.array(["Avenue"] * len(xs), dtype=object)
    part = partition_sub_streets(net, x, y, streets, SubStreetConfig(min_points=1))
    subs = part.sub_streets
    assert [s.sub_street for s in subs] == [f"Avenue/{k}" for k in range(5)]  # west to east
    assert [s.cross_streets for s in subs] == [
        ("West Road",), ("West Road", "North Lane"), ("North Lane", "Mid Street"), ("Mid Street", "East Road"),
        ("East Road",),
    ]
    # both carriageways' photos of a block share one label
    assert list(part.point_sub) == [k for k in range(5) for _ in range(4)]
    assert all(s.geometry.geom_type == "MultiLineString" and len(s.geometry.geoms) == 2 for s in subs)
    assert side_by_side(subs) == []
    # Mid Street cuts the north side; North Lane and South Lane (10 m apart) are one split point
    assert part.stats["parallel_cuts"] == 1 and part.stats["parallel_site_merges"] == 1
    # no place data: no neighbourhood, never a street name in its place
    assert {s.neighbourhood for s in subs} == {""}
    # without the parallel rule the sides are split differently and run side by side
    old = partition_sub_streets(net, x, y, streets, SubStreetConfig(min_points=1, parallel_merge_m=0))
    assert side_by_side(old.sub_streets)
    assert len({old.point_sub[i] for i in range(4, 8)}) == 2  # one block, two labels


def test_parallel_merge_distance_is_respected(tmp_path):
    far = [(n, hw, [(x, 60 if y == 14 else y) for x, y in pts]) if n == "Avenue" and pts[0][1] == 14 else (n, hw, pts)
           for n, hw, pts in DUAL_WAYS]
    net = load_street_network(write_geojson(tmp_path / "far.geojson", far, []))
    pieces, stats = split_streets(net, SubStreetConfig(parallel_merge_m=25))
    assert stats["parallel_cuts"] == 0  # 60 m apart: two streets of one name, not one dual road
    north = sorted((p.start, p.end) for p in pieces if p.street == "Avenue" and p.geom.coords[0][1] > ORIGIN[1] + 30)
    # the north way is crossed by West Road, North Lane and East Road only: Mid Street is not carried over
    assert north == sorted([("", "West Road"), ("West Road", "North Lane"), ("North Lane", "East Road"), ("East Road", "")])
    with pytest.raises(ValueError, match="parallel_merge_m"):
        SubStreetConfig(parallel_merge_m=-1)


def test_side_by_side_ignores_pieces_meeting_end_to_end():
    from clip_stage.data.substreet_types import SubStreet

    def sub(k, coords):
        return SubStreet(f"A/{k}", "A", (), LineString(coords))

    assert side_by_side([sub(0, [(0, 0), (100, 0)]), sub(1, [(100, 0), (200, 0)])]) == []
    assert side_by_side([sub(0, [(0, 0), (100, 0)]), sub(1, [(0, 10), (100, 10)])]) == [("A/0", "A/1", 100.0)]
    assert side_by_side([sub(0, [(0, 0), (40, 0)]), sub(1, [(0, 10), (40, 10)])]) == []  # under 50 m


def _along(x0, y0, x1, y1, n=7):
    t = np.linspace(0.15, 0.85, n)
    return list(x0 + t * (x1 - x0)), list(y0 + t * (y1 - y0))


def _partition(tmp_path, ways, segments, places=(), **cfg):
    """Partition of `segments` ((street, x0, y0, x1, y1), 7 points each) on an OSM network of `ways`."""
    net = load_street_network(write_osm(tmp_path / "net.osm", ways, list(places)))
    xs, ys, names = [], [], []
    for street, *ends in segments:
        a, b = _along(*ends)
        xs += a
        ys += b
        names += [street] * len(a)
    x, y = utm(xs, ys)
    return partition_sub_streets(net, x, y, np.array(names, dtype=object), SubStreetConfig(**cfg))


def _labels(part, street):
    return [s.cross_streets for s in part.sub_streets if s.street == street]


def test_blocks_between_the_same_cross_streets_in_two_places_stay_apart(tmp_path):
    # a crescent meets Main Road twice, Middle Street crosses between: two blocks, both bounded by the same two names
    ways = [("Main Road", "residential", [(-300, 0), (0, 0), (200, 0), (400, 0), (700, 0)]),
            ("The Crescent", "residential", [(0, 0), (0, 150), (400, 150), (400, 0)]),
            ("Middle Street", "residential", [(200, -200), (200, 150)]),
            ("West Street", "residential", [(-300, -200), (-300, 200)]),
            ("East Street", "residential", [(700, -200), (700, 200)])]
    segments = [("Main Road", -300, 0, 0, 0), ("Main Road", 0, 0, 200, 0), ("Main Road", 200, 0, 400, 0),
                ("Main Road", 400, 0, 700, 0)]
    part = _partition(tmp_path, ways, segments)
    assert _labels(part, "Main Road") == [("West Street", "The Crescent"), ("The Crescent", "Middle Street"),
                                          ("Middle Street", "The Crescent"), ("The Crescent", "East Street")]


def test_a_street_name_used_in_two_parts_of_town_is_two_sub_streets(tmp_path):
    ways = [(f"{side} Avenue", "residential", [(x, -100), (x, 100)]) for side, x in (("First", 0), ("Second", 300))]
    ways = [("Alpha Street", "residential", [(0, 0), (300, 0)]), *ways,
            ("Alpha Street", "residential", [(6000, 0), (6300, 0)]),
            ("First Avenue", "residential", [(6000, -100), (6000, 100)]),
            ("Second Avenue", "residential", [(6300, -100), (6300, 100)])]
    places = [("Westside", "suburb", 150, 50), ("Eastside", "suburb", 6150, 50)]
    part = _partition(tmp_path, ways, [("Alpha Street", 0, 0, 300, 0), ("Alpha Street", 6000, 0, 6300, 0)], places)
    assert [(s.cross_streets, s.neighbourhood, s.n_points) for s in part.sub_streets] == [
        (("First Avenue", "Second Avenue"), "Westside", 7), (("First Avenue", "Second Avenue"), "Eastside", 7)]
    # the same address text in the same neighbourhood is one class: an address names one place
    same = _partition(tmp_path, ways, [("Alpha Street", 0, 0, 300, 0), ("Alpha Street", 6000, 0, 6300, 0)],
                      [("Westside", "suburb", 3150, 50)], neighbourhood_max_distance_m=5000)
    assert [(s.neighbourhood, s.n_points) for s in same.sub_streets] == [("Westside", 14)]
    assert same.stats["same_address_merges"] == 1


def test_a_block_without_images_does_not_widen_its_neighbours_label(toy):
    x, y, streets = _main_points({1: MAIN_X[1], 2: MAIN_X[2]})  # nothing on the dead ends beyond First/Third Avenue
    part = partition_sub_streets(toy, x, y, streets, SubStreetConfig(min_points=5))
    assert [s.cross_streets for s in part.sub_streets] == [("First Avenue", "Second Avenue"),
                                                           ("Second Avenue", "Third Avenue")]
    assert part.stats["small_merges"] == 0


@pytest.mark.parametrize("continuation", ["Oak Avenue", "Aardvark Avenue", "Zulu Avenue"])
def test_a_street_carrying_on_under_another_name_is_not_its_cross_street(continuation, tmp_path):
    ways = [("Main Street", "residential", [(0, 0), (300, 0)]), (continuation, "residential", [(300, 0), (600, 0)]),
            ("Alpha Road", "residential", [(0, -150), (0, 150)]), ("Zeta Road", "residential", [(300, -150), (300, 0), (300, 150)]),
            ("Omega Road", "residential", [(600, -150), (600, 150)])]
    part = _partition(tmp_path, ways, [("Main Street", 0, 0, 300, 0), (continuation, 300, 0, 600, 0)])
    assert _labels(part, "Main Street") == [("Alpha Road", "Zeta Road")]
    assert _labels(part, continuation) == [("Zeta Road", "Omega Road")]


def test_a_street_meeting_a_roundabout_where_its_way_closes_bounds_both_ends(tmp_path):
    ring = [(round(40 * np.cos(t), 3), round(40 * np.sin(t), 3)) for t in np.linspace(0, 2 * np.pi, 25)[:-1]]
    ring.append(ring[0])  # the way starts and ends where East Road meets it
    ways = [("Circle Place", "primary", ring), ("East Road", "residential", [ring[0], (400, 0)]),
            ("North Road", "residential", [ring[6], (0, 400)]), ("West Road", "residential", [ring[12], (-400, 0)]),
            ("South Road", "residential", [ring[18], (0, -400)])]
    quarter = [("Circle Place", *ring[19], *ring[23])]  # the arc from South Road to East Road
    part = _partition(tmp_path, ways, quarter, min_points=1)
    assert _labels(part, "Circle Place") == [("South Road", "East Road")]
