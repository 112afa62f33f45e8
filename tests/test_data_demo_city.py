"""The built-in demo city: determinism, rows on real streets, bad rows, look-alike neighbours, and the builder."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
import shapely
from PIL import Image

from clip_stage.core.outdir import OutputFolderError
from clip_stage.data import build, demo_city, render

from clip_stage.core import schema
from llava_address.apps import cli

SMALL = dict(num_images=160, image_size=64, seed=3, bad_fraction=0.05)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "city"
    demo_city.generate_demo_city(out, demo_city.DemoCityConfig(**SMALL, workers=2))
    return out


@pytest.fixture(scope="module")
def network():
    return demo_city._load_network(demo_city.DemoCityConfig())


def _tables(out):
    gps = pd.read_csv(out / "gps.csv", dtype=str, keep_default_na=False)
    truth = pd.read_csv(out / "demo_truth.csv", dtype=str, keep_default_na=False)
    return gps, truth


def test_same_seed_same_city_whatever_the_workers(demo, tmp_path):
    again = tmp_path / "again"
    demo_city.generate_demo_city(again, demo_city.DemoCityConfig(**SMALL, workers=1))
    assert (again / "gps.csv").read_bytes() == (demo / "gps.csv").read_bytes()
    assert (again / "demo_truth.csv").read_bytes() == (demo / "demo_truth.csv").read_bytes()
    files = sorted(p.name for p in (demo / "images").iterdir())
    assert files == sorted(p.name for p in (again / "images").iterdir()) and len(files) > 150
    gps, truth = _tables(demo)
    for name in files:
        if truth.loc[truth["image_id"] == name.split(".")[0], "bad"].item() == "corrupt_image":
            continue
        a = np.asarray(Image.open(demo / "images" / name))
        b = np.asarray(Image.open(again / "images" / name))
        assert np.array_equal(a, b), name
    other = tmp_path / "other"
    demo_city.generate_demo_city(other, demo_city.DemoCityConfig(**{**SMALL, "seed": 4, "num_images": 40}))
    assert pd.read_csv(other / "gps.csv")["lat"].tolist() != pd.read_csv(demo / "gps.csv")["lat"].head(40).tolist()


def test_good_rows_lie_on_their_street_with_a_picture_and_caption(demo, network):
    gps, truth = _tables(demo)
    assert list(gps.columns) == list(demo_city.GPS_COLUMNS)
    assert len(gps) == SMALL["num_images"] and gps["image_id"].is_unique
    good = truth["bad"] == ""
    lines = defaultdict(list)
    for w in network.ways:
        x, y = network.to_utm(w.coords[:, 0], w.coords[:, 1])
        lines[w.name].append(shapely.LineString(np.stack([x, y], 1)))
    for g, t in zip(gps[good].itertuples(), truth[good].itertuples()):
        with Image.open(demo / "images" / g.image) as im:
            assert im.size == (SMALL["image_size"],) * 2 and im.mode == "RGB"
        x, y = network.to_utm(float(g.lon), float(g.lat))
        # the point is on its street, up to the lateral jitter (3 m standard deviation)
        assert min(line.distance(shapely.Point(x, y)) for line in lines[t.street]) < 15.0, (g.image_id, t.street)
        words = g.caption.split()
        assert g.caption.startswith("a street view of") and 10 <= len(words) <= 30, g.caption
    assert truth.loc[good, "street"].nunique() > 30


def test_bad_rows_one_of_each_kind(demo, network):
    gps, truth = _tables(demo)
    meta = json.loads((demo / "demo_city.json").read_text())
    n_bad = round(SMALL["num_images"] * SMALL["bad_fraction"])
    assert sum(meta["bad_rows"].values()) == n_bad == (truth["bad"] != "").sum()
    assert set(truth["bad"]) - {""} == set(demo_city.BAD_KINDS)
    x0, y0, x1, y1 = network.bounds()
    for g, t in zip(gps.itertuples(), truth.itertuples()):
        path = demo / "images" / g.image
        if t.bad == "corrupt_image":
            with pytest.raises(OSError):
                Image.open(path).load()
        elif t.bad == "missing_image":
            assert not path.exists()
        elif t.bad == "nan_gps":
            assert np.isnan(float(g.lat))
        elif t.bad == "out_of_range_gps":
            assert abs(float(g.lat)) > 90
        elif t.bad == "far_from_street":
            assert float(g.lat) > y1 + 0.03  # kilometres beyond the map
        elif t.bad == "duplicate":
            twins = [p for p in (demo / "images").iterdir() if p != path and p.read_bytes() == path.read_bytes()]
            assert len(twins) == 1
            twin = gps[gps["image"] == twins[0].name].iloc[0]
            assert (twin.lat, twin.lon) == (g.lat, g.lon)


def _histogram(a: np.ndarray) -> np.ndarray:
    q = (a.astype(int) // 64).reshape(-1, 3)
    return np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64) / len(q)


def test_nearby_pictures_look_alike_blocks_and_streets_differ(network):
    """Pictures taken on one block are more alike than pictures of another block of the same street,
    which are more alike than pictures of other streets; a 1-NN on colour histograms finds the block
    far above chance, but not always (the task is learnable, not trivial)."""
    seg = demo_city._segments(network)
    field = demo_city._Field(0, seg.a.mean(0))
    by_block = defaultdict(list)
    for i, b in enumerate(seg.block):
        by_block[b].append(i)
    streets = defaultdict(list)
    for b in by_block:
        if "#" not in b:
            streets[b.split("|")[0]].append(b)
    chosen = sorted(s for s, bs in streets.items() if len(bs) >= 3)[:6]
    assert len(chosen) == 6
    rng = np.random.default_rng(0)
    feats, block, street = [], [], []
    for st in chosen:
        for b in streets[st][:3]:
            for k in range(6):
                e = by_block[b][rng.integers(len(by_block[b]))]
                frac = rng.random()
                p = seg.a[e] + (seg.b[e] - seg.a[e]) * frac
                s = seg.s0[e] + frac * np.hypot(*(seg.b[e] - seg.a[e]))
                scene = demo_city._scene(0, len(feats), st, b, p, s, rng.normal(0, 3), field)
                feats.append(_histogram(render.render_scene(scene, 64)))
                block.append(b)
                street.append(st)
    f, block, street = np.array(feats), np.array(block), np.array(street)
    d = np.abs(f[:, None] - f[None]).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn = d.argmin(1)
    block_acc, street_acc = (block[nn] == block).mean(), (street[nn] == street).mean()
    assert 3 / 18 < block_acc < 0.95, block_acc  # chance 1/18
    assert street_acc > 3 / 6, street_acc  # chance 1/6
    same_block = block[:, None] == block[None]
    same_street = street[:, None] == street[None]
    finite = np.isfinite(d)
    within, sibling, other = (d[m & finite].mean() for m in (same_block, same_street & ~same_block, ~same_street))
    assert within < sibling < other


def test_appearance_drifts_smoothly(network):
    seg = demo_city._segments(network)
    field = demo_city._Field(0, seg.a.mean(0))
    rng = np.random.default_rng(1)
    p = seg.a[rng.integers(len(seg.a), size=200)]
    step = field(p[0] + [2.0, 0.0]) - field(p[0])
    assert np.abs(step).max() < 0.05
    values = np.array([field(q) for q in p])
    assert values.std(0).min() > 0.2  # but it does change across the city
    # same block, 2 m apart: same facades up to the drift
    e = 0
    a = demo_city._scene(0, 5, seg.street[e], seg.block[e], seg.a[e], seg.s0[e], 0.0, field)
    b = demo_city._scene(0, 5, seg.street[e], seg.block[e], seg.a[e] + [2.0, 0.0], seg.s0[e] + 2, 0.0, field)
    assert a.left.colour_name == b.left.colour_name and a.left.building_seed == b.left.building_seed
    assert abs(a.left.floors - b.left.floors) < 0.1


def test_caption_follows_the_scene(network):
    seg = demo_city._segments(network)
    field = demo_city._Field(0, seg.a.mean(0))
    scene = demo_city._scene(0, 0, seg.street[0], seg.block[0], seg.a[0], seg.s0[0], 0.0, field)
    tram = render.caption_scene(dataclasses.replace(scene, tram=True, cars=(), pedestrians=()))
    plain = render.caption_scene(dataclasses.replace(scene, tram=False, cars=(), pedestrians=()))
    assert "tram line" in tram and "tram" not in plain
    assert scene.left.colour_name in tram and scene.right.colour_name in tram


def test_demo_feeds_the_dataset_builder(demo, tmp_path):
    out = tmp_path / "dataset"
    assert build.main(["--images", str(demo / "images"), "--gps", str(demo / "gps.csv"), "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / schema.REPORT_FILE).read_text())
    # every deliberately bad row is caught, each with its own reason
    for reason in ("corrupt_image", "image_not_found", "missing_gps", "gps_out_of_range", "far_from_street", "duplicate_image"):
        assert report["rejected"].get(reason, 0) >= 1, (reason, report["rejected"])
    df = schema.read_records(out)
    truth = pd.read_csv(demo / "demo_truth.csv", dtype=str, keep_default_na=False).set_index("image_id")
    agree = (df["street"].to_numpy() == truth.loc[df["image_id"], "street"].to_numpy()).mean()
    assert agree > 0.9, agree  # the builder's geocoding finds the street the picture was rendered for
    assert df["sub_street"].nunique() >= 20 and df["street"].nunique() >= 20


def test_cli_and_config_checks(tmp_path, capsys):
    out = tmp_path / "city"
    assert cli.main(["demo-city", "--out", str(out), "--num-images", "12", "--image-size", "64", "--bad-fraction", "0"]) == 0
    assert "12 rows" in capsys.readouterr().out
    with open(out / "gps.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 12
    # an earlier demo folder is replaced (--overwrite); any other non-empty folder is refused
    assert demo_city.main(["--out", str(out), "--num-images", "5", "--image-size", "64", "--overwrite"]) == 0
    assert len(list((out / "images").iterdir())) == 5
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    for overwrite in (False, True):  # the Python API keeps the command's rule: never another kind of folder
        with pytest.raises(OutputFolderError, match="not a demo-city output"):
            demo_city.generate_demo_city(precious, demo_city.DemoCityConfig(num_images=5, image_size=64), overwrite)
    assert (precious / "thesis.txt").read_text() == "keep me"
    with pytest.raises(OutputFolderError, match="pass --overwrite"):  # an earlier one only when asked
        demo_city.generate_demo_city(out, demo_city.DemoCityConfig(num_images=5, image_size=64))
    capsys.readouterr()
    assert demo_city.main(["--out", str(out), "--image-size", "500"]) == 2
    assert capsys.readouterr().err.strip() == "demo-city: error: image_size must be in 64..224, got 500"
    with pytest.raises(ValueError, match="bad_fraction"):
        demo_city.DemoCityConfig(bad_fraction=0.9)


def test_blocks_split_at_cross_streets_of_any_network(tmp_path):
    """A hand-made grid: two east-west streets crossed by two north-south ones; `--network` reads it."""
    from pyproj import Transformer

    to_wgs = Transformer.from_crs(32635, 4326, always_xy=True)

    def line(points):
        return [list(to_wgs.transform(385000 + x, 6672000 + y)) for x, y in points]

    streets = {
        "Etelätie": [(0, 0), (100, 0), (200, 0), (300, 0)],
        "Pohjoistie": [(0, 150), (100, 150), (200, 150), (300, 150)],
        "Länsikatu": [(100, -100), (100, 0), (100, 150), (100, 250)],
        "Itäkatu": [(200, -100), (200, 0), (200, 150), (200, 250)],
    }
    path = tmp_path / "grid.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"name": n, "highway": "residential"},
         "geometry": {"type": "LineString", "coordinates": line(p)}} for n, p in streets.items()]}))
    seg = demo_city._segments(demo_city.load_street_network(path))
    blocks = defaultdict(set)
    for st, b in zip(seg.street, seg.block):
        blocks[st].add(b)
    assert blocks["Etelätie"] == {"Etelätie|Länsikatu", "Etelätie|Itäkatu|Länsikatu", "Etelätie|Itäkatu"}
    assert blocks["Länsikatu"] == {"Länsikatu|Etelätie", "Länsikatu|Etelätie|Pohjoistie", "Länsikatu|Pohjoistie"}
    out = tmp_path / "grid_city"
    demo_city.generate_demo_city(out, demo_city.DemoCityConfig(num_images=30, image_size=64, bad_fraction=0, network=str(path)))
    truth = pd.read_csv(out / "demo_truth.csv", dtype=str, keep_default_na=False)
    assert set(truth["street"]) <= set(streets) and truth["block"].nunique() > 4
    assert json.loads((out / "demo_city.json").read_text())["network"] == str(path)
