"""The dataset builder end to end: layout, rejects with reasons, atomic output, splits, summary, Helsinki."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clip_stage.data import build
from clip_stage.data.build import main
from clip_stage.data.splits import SplitConfig, assign_splits
from clip_stage.data.summary import summary, summary_main
from clip_stage.core.schema import COLUMNS, DatasetPaths, read_info, read_records, read_sub_streets
from tests.test_data_network import lonlat, write_graphml, write_osm
from tests.test_data_substreets import MAIN_X

GOOD = (
    [(x, (-1) ** i * 2.0) for i, x in enumerate(x for k in sorted(MAIN_X) for x in MAIN_X[k])]
    + [(101.0, y) for y in (40, 70, 100, 130, 160, 190)]
    + [(499.0, y) for y in (-190, -160, -130, -100, -70, -40)]
)


def _png(path: Path, seed: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def make_inputs(root: Path, fmt: str = "csv"):
    """Images + a GPS table with GOOD rows and one bad row of each kind; returns paths and expectations."""
    images = root / "photos"
    rows: list[dict] = []
    for i, (x, y) in enumerate(GOOD):
        rel = f"{'east' if x > 300 else 'west'}/img{i:03d}.png"
        _png(images / rel, i)
        lon, lat = lonlat(x, y)
        rows.append({"image": rel, "lat": f"{lat:.8f}", "lon": f"{lon:.8f}", "caption": f"scene {i}"})
    n_good = len(rows)
    lon, lat = (f"{v:.8f}" for v in lonlat(200, 3))  # a fine place on Main Street for the bad rows

    def bad(name, **kw):
        rows.append({"image": name, "lat": lat, "lon": lon, "caption": "", **kw})

    (images / "west" / "broken.png").write_bytes((images / "west/img000.png").read_bytes()[:60])
    bad("west/broken.png")
    for name in ("nan.png", "empty.png", "word.png", "range.png", "far.png", "cross.png", "copy.png"):
        _png(images / name, 1000 + len(rows))
    bad("nan.png", lat="NaN")
    bad("empty.png", lon="")
    bad("word.png", lat="sixty")
    bad("range.png", lon="200")
    far = lonlat(200, 150)
    bad("far.png", lon=f"{far[0]:.8f}", lat=f"{far[1]:.8f}")
    cross = lonlat(100, 0)
    bad("cross.png", lon=f"{cross[0]:.8f}", lat=f"{cross[1]:.8f}")
    bad("west/img001.png")  # the same path again
    shutil.copy(images / "west/img002.png", images / "copy.png")
    bad("copy.png")  # the same content under another name
    bad("missing.png")
    (root / "outside.png").write_bytes((images / "west/img000.png").read_bytes())
    bad("../outside.png")
    bad("")
    expected = {  # row (1-based) -> (reason, field)
        n_good + 1: ("corrupt_image", "image"), n_good + 2: ("missing_gps", "lat"), n_good + 3: ("missing_gps", "lon"),
        n_good + 4: ("bad_gps", "lat"), n_good + 5: ("gps_out_of_range", "lon"),
        n_good + 6: ("far_from_street", "lat,lon"), n_good + 7: ("ambiguous", "lat,lon"),
        n_good + 8: ("duplicate_path", "image"), n_good + 9: ("duplicate_image", "image"),
        n_good + 10: ("image_not_found", "image"), n_good + 11: ("unsafe_path", "image"),
        n_good + 12: ("missing_image", "image"),
    }
    if fmt == "csv":
        table = root / "gps.csv"
        with table.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["image", "lat", "lon", "caption"])
            w.writeheader()
            w.writerows(rows)
            f.write("extra.png,60.1,24.9,caption,unexpected\n")
        expected[len(rows) + 1] = ("malformed_row", "row")
    else:
        table = root / "gps.jsonl"
        with table.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.write("{not json\n")
            # JSON types a CSV cannot have: refused, not coerced ("['a.png']" would be a path, 5 a caption "5.0")
            f.write(json.dumps({"image": ["west/img000.png"], "lat": 60.1, "lon": 24.9}) + "\n")
            f.write(json.dumps({"image": "west/img001.png", "lat": 60.1, "lon": 24.9, "caption": 5}) + "\n")
            f.write(json.dumps({"image": "west/img001.png", "lat": True, "lon": 24.9}) + "\n")
        expected[len(rows) + 1] = ("malformed_row", "row")
        expected[len(rows) + 2] = ("malformed_row", "image")
        expected[len(rows) + 3] = ("malformed_row", "caption")
        expected[len(rows) + 4] = ("malformed_row", "lat")
    network = write_osm(root / "toy.osm")
    return images, table, network, expected, n_good


def _argv(images, table, network, out, *extra):
    return ["--images", str(images), "--gps", str(table), "--network", str(network), "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    images, table, network, expected, n_good = make_inputs(root)
    out = root / "dataset"
    assert main(_argv(images, table, network, out, "--city", "Toytown", "--min-points", "3")) == 0
    return out, expected, n_good, images


def test_layout_and_records(built):
    out, expected, n_good, images = built
    paths = DatasetPaths(out)
    for p in (paths.records, paths.sub_streets, paths.info, paths.report, paths.rejects, paths.images):
        assert p.exists(), p
    df = read_records(out)
    assert list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert len(df) == n_good
    assert set(df["street"]) == {"Main Street", "First Avenue", "Third Avenue"}
    for r in df.itertuples():
        assert (paths.images / r.image).read_bytes() == (images / r.image).read_bytes()
    row = df.set_index("image").loc["west/img000.png"]
    assert row["sub_street"] == "Main Street/0" and list(row["cross_streets"]) == ["First Avenue"]
    assert row["address_full"] == "Main Street near First Avenue, Westside, Toytown"
    assert row["caption"] == "scene 0" and row["city"] == "Toytown"
    assert row["image_id"] == "west/img000.png"  # no image_id column: the relative path
    first = df[df["street"] == "First Avenue"]
    assert first["sub_street"].unique().tolist() == ["First Avenue/0"]
    assert first["address_sub_street"].iloc[0] == "First Avenue near Main Street"
    info = read_info(out)
    assert info["city"] == "Toytown" and info["utm_epsg"] == 32635
    assert info["config"]["sub_streets"]["min_points"] == 3 and info["config"]["split"]["split"] == "random"
    feats = read_sub_streets(out)
    assert sorted(f["sub_street"] for f in feats) == sorted(df["sub_street"].unique())
    assert all(f["geometry"].geom_type in ("LineString", "MultiLineString") for f in feats)
    counts = df.groupby("sub_street").size().to_dict()
    assert {f["sub_street"]: f["n_images"] for f in feats} == counts


def test_every_bad_row_is_rejected_with_row_field_and_reason(built):
    out, expected, n_good, _ = built
    rejects = [json.loads(line) for line in DatasetPaths(out).rejects.read_text(encoding="utf-8").splitlines()]
    assert {r["row"]: (r["reason"], r["field"]) for r in rejects} == expected
    report = json.loads(DatasetPaths(out).report.read_text(encoding="utf-8"))
    assert report["kept"] == n_good and report["input_rows"] == n_good + len(expected)
    assert report["rejected_total"] == len(expected)
    assert report["rejected"] == {reason: sum(1 for r, _ in expected.values() if r == reason) for reason, _ in expected.values()}
    by_reason = {r["reason"]: r for r in rejects}
    assert "row 2" in by_reason["duplicate_path"]["detail"] and "row 3" in by_reason["duplicate_image"]["detail"]
    assert "escapes the image root" in by_reason["unsafe_path"]["detail"]
    s = summary(out)
    assert s["rejected"] == report["rejected"] and s["images"] == n_good


def test_jsonl_input_gives_the_same_dataset(tmp_path, built):
    out_csv = built[0]
    images, table, network, expected, n_good = make_inputs(tmp_path, fmt="jsonl")
    out = tmp_path / "ds"
    assert main(_argv(images, table, network, out, "--city", "Toytown", "--min-points", "3")) == 0
    a, b = read_records(out_csv), read_records(out)
    cols = ["image", "street", "sub_street", "address_full", "split"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    rejects = [json.loads(line) for line in DatasetPaths(out).rejects.read_text(encoding="utf-8").splitlines()]
    assert {r["row"]: r["reason"] for r in rejects} == {k: v[0] for k, v in expected.items()}
    assert {r["row"]: r["field"] for r in rejects} == {k: v[1] for k, v in expected.items()}


def test_a_failure_mid_build_leaves_no_dataset(tmp_path, monkeypatch, built):
    images, table, network, *_ = make_inputs(tmp_path)
    out = tmp_path / "ds"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(build, "RecordsWriter", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        main(_argv(images, table, network, out))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds")] == []
    # an existing dataset survives a failed rebuild untouched
    shutil.copytree(built[0], out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(RuntimeError):
        main(_argv(images, table, network, out, "--overwrite"))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    monkeypatch.undo()
    assert main(_argv(images, table, network, out, "--overwrite")) == 0
    assert len(read_records(out)) > 0


def test_bad_network_and_existing_output_are_clear_errors(tmp_path, capsys):
    images, table, network, *_ = make_inputs(tmp_path)
    bad = tmp_path / "bad.osm.pbf"
    bad.write_bytes(b"garbage" * 20)
    with pytest.raises(SystemExit) as e:
        main(_argv(images, table, bad, tmp_path / "ds"))
    assert e.value.code == 2 and str(bad) in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "precious.txt").write_text("keep")
    for extra in ((), ("--overwrite",)):  # not a dataset folder: never replaced
        with pytest.raises(SystemExit):
            main(_argv(images, table, network, tmp_path / "ds", *extra))
        assert "exists" in capsys.readouterr().err
    assert (tmp_path / "ds" / "precious.txt").read_text() == "keep"
    nocols = tmp_path / "nocols.csv"
    nocols.write_text("path,latitude\nx.png,60\n")
    with pytest.raises(SystemExit):
        main(_argv(images, nocols, network, tmp_path / "ds2"))
    err = capsys.readouterr().err
    assert str(nocols) in err and "missing column" in err


def test_random_split_is_stratified_and_seeded():
    rng = np.random.default_rng(0)
    sub = rng.integers(0, 40, 2000)
    x, y = rng.uniform(0, 1000, 2000), rng.uniform(0, 1000, 2000)
    cfg = SplitConfig(split="random", val_fraction=0.1, test_fraction=0.2, seed=3)
    s = assign_splits(x, y, sub, cfg)
    assert abs((s == "test").mean() - 0.2) < 0.03 and abs((s == "val").mean() - 0.1) < 0.03
    assert set(sub[s == "test"]) <= set(sub[s == "train"])  # every test sub-street is seen in training
    single = assign_splits(x[:3], y[:3], np.array([0, 1, 2]), cfg)
    assert list(single) == ["train"] * 3  # a one-image sub-street stays in train
    assert (assign_splits(x, y, sub, cfg) == s).all()
    assert not (assign_splits(x, y, sub, SplitConfig(seed=4)) == s).all()


def test_geo_split_holds_out_whole_tiles():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 2000, 3000), rng.uniform(0, 2000, 3000)
    cfg = SplitConfig(split="geo", tile_size_m=250, val_fraction=0.1, test_fraction=0.2, seed=1)
    s = assign_splits(x, y, np.zeros(3000, dtype=int), cfg)
    tiles = pd.Series(list(zip(np.floor(x / 250), np.floor(y / 250))))
    per_tile = pd.DataFrame({"tile": tiles, "split": s}).groupby("tile")["split"].nunique()
    assert (per_tile == 1).all()  # no tile mixes splits: no test tile has a training image
    assert 0.15 < (s == "test").mean() < 0.3 and 0.05 < (s == "val").mean() < 0.2
    with pytest.raises(ValueError):
        SplitConfig(val_fraction=0.5, test_fraction=0.6)


def test_geo_split_through_the_console_command_and_a_config_file(tmp_path):
    from llava_address.apps.cli import main as cli_main

    images, table, network, *_ = make_inputs(tmp_path)
    out = tmp_path / "geo"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("split:\n  split: geo\n  tile_size_m: 150\n  test_fraction: 0.5\nbuild:\n  image_mode: copy\n")
    argv = _argv(images, table, network, out, "--config", str(recipe), "--test-fraction", "0.3", "--val-fraction", "0")
    assert cli_main(["build-dataset", *argv]) == 0
    info = read_info(out)["config"]
    assert info["split"] == {"split": "geo", "tile_size_m": 150.0, "test_fraction": 0.3, "val_fraction": 0.0, "seed": 0}
    df = read_records(out)
    tile = list(zip(np.floor(df["utm_x"] / 150), np.floor(df["utm_y"] / 150)))
    mixed = pd.DataFrame({"tile": tile, "split": df["split"]}).groupby("tile")["split"].nunique()
    assert (mixed == 1).all() and set(df["split"]) == {"train", "test"}
    assert not (DatasetPaths(out).images / df["image"].iloc[0]).is_symlink()


def test_summary_command_prints_a_table(built, capsys):
    out = built[0]
    assert summary_main([str(out)]) == 0
    text = capsys.readouterr().out
    df = read_records(out)
    assert "sub-streets" in text and str(df["sub_street"].nunique()) in text and "far_from_street" in text
    s = summary(out)
    assert s["splits"]["train"] + s["splits"]["val"] + s["splits"]["test"] == len(df)
    assert s["images_per_sub_street"]["max"] == df.groupby("sub_street").size().max()
    assert s["neighbourhoods"] == df["neighbourhood"].value_counts().sort_index().to_dict()
    assert summary_main([str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["streets"] == 3
    assert "EPSG:" in text  # and without its dataset_info.json the table says so, not "EPSG:None"
    bare = out.parent / "bare"
    shutil.copytree(out, bare)
    (bare / "dataset_info.json").unlink()
    assert summary_main([str(bare)]) == 0
    assert "no dataset_info.json" in capsys.readouterr().out


def test_helsinki_build(tmp_path):
    """Points along real Helsinki streets (default network) -> a dataset with sensible numbers."""
    from clip_stage.data.geocode import ReverseGeocoder
    from clip_stage.data.network import helsinki_pbf_path, load_street_network

    net = load_street_network(helsinki_pbf_path())
    lines = ReverseGeocoder(net).lines_utm
    rng = np.random.default_rng(0)
    pts = []
    for line in lines:
        seg = np.hypot(*np.diff(line, axis=0).T)
        for k in np.flatnonzero(seg > 40):
            for t in (0.3, 0.5, 0.7):
                pts.append(line[k] + t * (line[k + 1] - line[k]) + rng.normal(0, 2, 2))
    pts = np.array(pts)
    lon, lat = net.to_wgs84(pts[:, 0], pts[:, 1])
    images = tmp_path / "img"
    with (tmp_path / "gps.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "lat", "lon", "image_id"])
        for i in range(len(pts)):
            _png(images / f"{i:05d}.png", i, size=8)
            w.writerow([f"{i:05d}.png", f"{lat[i]:.7f}", f"{lon[i]:.7f}", f"h{i}"])
    out = tmp_path / "hel"
    assert main(["--images", str(images), "--gps", str(tmp_path / "gps.csv"), "--out", str(out), "--quiet",
                 "--image-check", "verify", "--split", "geo"]) == 0
    df = read_records(out)
    s = summary(out)
    assert s["city"] == "Helsinki" and len(df) > 0.9 * len(pts)
    assert s["streets"] > 30 and s["sub_streets"] > 50
    assert df["image_id"].str.startswith("h").all()
    assert {"Mannerheimintie", "Bulevardi"} <= set(df["street"])
    assert df["neighbourhood"].ne("").all()


def test_an_empty_rebuild_never_replaces_an_earlier_dataset(tmp_path, capsys, built):
    images, table, network, *_ = make_inputs(tmp_path)
    out = tmp_path / "ds"
    shutil.copytree(built[0], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    swapped = tmp_path / "swapped.csv"  # lat and lon exchanged: every row lands far from any street
    with table.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    swapped.write_text("image,lat,lon\n" + "".join(f"{r['image']},{r['lon']},{r['lat']}\n" for r in rows[:5]))
    with pytest.raises(SystemExit) as e:
        main(_argv(images, swapped, network, out, "--overwrite"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no image was kept of 5 rows" in err and "left as it was" in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_extra_columns_are_reported_and_never_replace_the_record_number(tmp_path, capsys):
    images, table, network, *_ = make_inputs(tmp_path)
    with table.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:6]
    typo = tmp_path / "typo.csv"
    typo.write_text("image,lat,lon,captoin,row\n" + "".join(
        f"{r['image'] if i != 2 else 'missing.png'},{r['lat']},{r['lon']},{r['caption']},street-{i}\n"
        for i, r in enumerate(rows)))
    out = tmp_path / "ds"
    assert main(_argv(images, typo, network, out, "--min-points", "1")) == 0
    warning = "column(s) ['captoin', 'row'] not read"
    assert warning in capsys.readouterr().err
    assert any(warning in w for w in json.loads(DatasetPaths(out).report.read_text())["warnings"])
    rejects = [json.loads(line) for line in DatasetPaths(out).rejects.read_text().splitlines()]
    assert [(r["row"], r["reason"]) for r in rejects if r["reason"] == "image_not_found"] == [(3, "image_not_found")]
    kept_rows = set(read_records(out)["source_row"])
    assert kept_rows and kept_rows <= {1, 2, 4, 5, 6}  # the record numbers, not the table's own "row" texts


def test_a_graphml_with_edges_of_several_names_is_reported(tmp_path, capsys):
    images, table, _, *_ = make_inputs(tmp_path)
    out = tmp_path / "ds"
    assert main(_argv(images, table, write_graphml(tmp_path / "toy.graphml"), out, "--min-points", "1")) == 0
    warning = "edges carry several street names"
    assert warning in capsys.readouterr().err
    assert any(warning in w for w in json.loads(DatasetPaths(out).report.read_text())["warnings"])
