"""Reverse geocoding: right street, far / ambiguous rejects, T-junction voting, agreement with the naive loop."""

from __future__ import annotations

import numpy as np
import pytest

from clip_stage.data.geocode import AMBIGUOUS, FAR_FROM_STREET, GeocodeConfig, ReverseGeocoder, naive_geocode_xy
from clip_stage.data.network import helsinki_pbf_path, load_street_network
from tests.test_data_network import utm, write_osm


@pytest.fixture(scope="module")
def toy_geocoder(tmp_path_factory):
    return ReverseGeocoder(load_street_network(write_osm(tmp_path_factory.mktemp("net") / "toy.osm")))


@pytest.fixture(scope="module")
def helsinki():
    return load_street_network(helsinki_pbf_path())


def test_points_land_on_the_right_street(toy_geocoder):
    pts = [(50, 3), (200, -4), (550, 2), (100, 150), (296, -120), (505, 80), (315, 100), (200, 28)]
    want = ["Main Street", "Main Street", "Main Street", "First Avenue", "Second Avenue", "Third Avenue",
            "Close Lane", "Main Street"]  # the footway at y=40 is not a street: the last point is on Main Street
    r = toy_geocoder.geocode_xy(*utm([p[0] for p in pts], [p[1] for p in pts]))
    assert list(r.street) == want
    assert list(r.reason) == [""] * len(pts)
    assert r.ok.all()
    np.testing.assert_allclose(r.distance_m[:4], [3, 4, 2, 0], atol=0.02)  # OSM stores 1e-7 degrees


def test_far_and_ambiguous_points_are_rejected_with_a_reason(toy_geocoder):
    pts = [(200, 40), (1000, 1000), (100, 0), (300, -1), (102, 1)]
    r = toy_geocoder.geocode_xy(*utm([p[0] for p in pts], [p[1] for p in pts]))
    assert list(r.reason) == [FAR_FROM_STREET, FAR_FROM_STREET, AMBIGUOUS, AMBIGUOUS, AMBIGUOUS]
    assert list(r.street_id) == [-1] * 5 and list(r.street) == [""] * 5
    assert r.distance_m[0] == pytest.approx(40, abs=0.02)  # nearest street, beyond max_distance_m (30)
    assert np.isinf(r.distance_m[1])  # nothing within the search radius at all


def test_t_junction_votes_for_the_through_street(toy_geocoder):
    # Close Lane ends on Main Street at x=315: right at its end the through street gets more votes
    r = toy_geocoder.geocode_xy(*utm([315, 330], [1, 2]))
    assert list(r.street) == ["Main Street", "Main Street"]
    # but well inside Close Lane it wins
    r = toy_geocoder.geocode_xy(*utm([316], [60]))
    assert list(r.street) == ["Close Lane"]


def test_thresholds_are_configurable(tmp_path):
    net = load_street_network(write_osm(tmp_path / "toy.osm"))
    loose = ReverseGeocoder(net, GeocodeConfig(search_radius_m=120, max_distance_m=100, ambiguity_margin=0.0))
    r = loose.geocode_xy(*utm([200, 300], [80, -1]))
    assert list(r.street) == ["Main Street", "Second Avenue"]
    with pytest.raises(ValueError, match="max_distance_m"):
        GeocodeConfig(search_radius_m=10, max_distance_m=30)
    with pytest.raises(ValueError, match="ambiguity_margin"):
        GeocodeConfig(ambiguity_margin=1.5)


def test_vectorised_matches_the_naive_loop_on_helsinki(helsinki):
    g = ReverseGeocoder(helsinki)
    rng = np.random.default_rng(1)
    lon0, lat0, lon1, lat1 = helsinki.bounds()
    x, y = helsinki.to_utm(rng.uniform(lon0, lon1, 400), rng.uniform(lat0, lat1, 400))
    fast = g.geocode_xy(x, y)
    slow = naive_geocode_xy(g.lines_utm, [w.name for w in helsinki.ways], x, y)
    assert [(s, r) for s, r in zip(fast.street, fast.reason)] == slow
    assert fast.ok.sum() > 100 and (fast.reason == FAR_FROM_STREET).sum() > 50  # both paths exercised


def test_helsinki_points_on_known_streets(helsinki):
    g = ReverseGeocoder(helsinki)
    want, xs, ys = [], [], []
    for name in ("Mannerheimintie", "Bulevardi", "Aleksanterinkatu", "Fredrikinkatu"):
        # the middle of the street's longest straight segment, offset 3 m sideways
        segs = []
        for w in helsinki.ways:
            if w.name == name:
                x, y = helsinki.to_utm(w.coords[:, 0], w.coords[:, 1])
                segs += [(np.hypot(x[k] - x[k - 1], y[k] - y[k - 1]), x[k - 1], y[k - 1], x[k], y[k]) for k in range(1, len(x))]
        _, x0, y0, x1, y1 = max(segs)
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        d = np.array([x1 - x0, y1 - y0])
        n = np.array([-d[1], d[0]]) / np.hypot(*d)
        xs.append(mx + 3 * n[0])
        ys.append(my + 3 * n[1])
        want.append(name)
    r = g.geocode_xy(np.array(xs), np.array(ys))
    got = [s if s else reason for s, reason in zip(r.street, r.reason)]
    assert got == want
