"""build-dataset beyond a GPS table: EXIF GPS from phone photos (JPEG/PNG/WebP/HEIC, rotated, without GPS),
chunked builds equal to one-chunk builds, the pure per-chunk step, symlink escapes, --image-mode root, and
addresses where no neighbourhood or city exists (never the street name)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from clip_stage.data import exif_gps
from clip_stage.data.build import main
from clip_stage.data.row_checks import check_chunk
from clip_stage.data.summary import format_summary, summary
from clip_stage.data.geocode import ReverseGeocoder
from clip_stage.data.network import load_street_network
from clip_stage.core.schema import Address, DatasetPaths, read_records, render_address
from tests.test_data_build import GOOD, _argv, make_inputs
from tests.test_data_network import lonlat, write_osm


def _photo(path, x, y, fmt, orientation=1, size=(24, 12), seed=0, gps=True):
    """A small photo with camera-style EXIF: GPS IFD at toy-town metres (x, y) and an orientation tag."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x010F] = "TestPhone"  # Make, as every camera writes (Pillow's PNG writer drops an EXIF with only a GPS IFD)
    if gps:
        lon, lat = lonlat(x, y)
        exif.get_ifd(exif_gps.GPS_IFD).update(exif_gps.exif_to_gps_ifd(float(lat), float(lon)))
    if orientation != 1:
        exif[exif_gps.ORIENTATION] = orientation
    Image.fromarray(arr).save(path, format=fmt, exif=exif)
    return path


@pytest.fixture(scope="module")
def phones(tmp_path_factory):
    root = tmp_path_factory.mktemp("phones")
    photos = root / "DCIM"
    fmts = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")]
    for i, (x, y) in enumerate(GOOD):
        fmt, ext = fmts[i % 3]
        _photo(photos / f"{i:03d}.{ext}", x, y, fmt, seed=i)
    # a portrait photo stored sideways, tagged "rotate 90 clockwise to view" (6): lossless PNG to compare pixels
    rotated = _photo(photos / "sideways" / "r.png", 200, 2, "PNG", orientation=6, size=(30, 10), seed=500)
    _photo(photos / "nogps.jpg", 0, 0, "JPEG", seed=501, gps=False)
    (photos / "notes.txt").write_text("not a photo")  # not an image suffix: not a row at all
    heif = exif_gps.register_heif()
    if heif:
        _photo(photos / "iphone.heic", 230, -2, "HEIF", seed=502)
    else:  # without the optional plugin a HEIC file must be a clear reject, not a crash
        (photos / "iphone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(40))
    net = write_osm(root / "toy.osm")
    out = root / "ds"
    assert main(["--images", str(photos), "--network", str(net), "--out", str(out), "--quiet", "--city", "Toytown",
                 "--min-points", "3"]) == 0
    return photos, out, rotated, heif


def test_exif_gps_round_trips_in_every_format(tmp_path):
    exif_gps.register_heif()
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")):
        p = _photo(tmp_path / f"a.{ext}", 120, -45, fmt)
        (lat, lon), why = exif_gps.read_photo_gps(p)
        want_lon, want_lat = lonlat(120, -45)
        assert why == "" and abs(lat - want_lat) < 1e-6 and abs(lon - want_lon) < 1e-6
    # southern / western hemispheres through the reference tags
    exif = Image.Exif()
    exif[0x010F] = "TestPhone"
    exif.get_ifd(exif_gps.GPS_IFD).update(exif_gps.exif_to_gps_ifd(-33.8688, -151.2093))
    Image.new("RGB", (4, 4)).save(tmp_path / "sw.jpg", exif=exif)
    (lat, lon), _ = exif_gps.read_photo_gps(tmp_path / "sw.jpg")
    assert abs(lat + 33.8688) < 1e-6 and abs(lon + 151.2093) < 1e-6


def test_photo_folder_without_gps_table(phones):
    photos, out, rotated, heif = phones
    df = read_records(out)
    n_expected = len(GOOD) + 1 + int(heif)  # + the rotated one (+ the HEIC one when the plugin is there)
    assert len(df) == n_expected
    assert set(df["image"].str.rsplit(".", n=1).str[1]) == {"jpg", "png", "webp"} | ({"heic"} if heif else set())
    assert (df["image_id"] == df["image"]).all()  # image_id = the relative path
    row = df.set_index("image").loc["000.jpg"]
    assert row["street"] == "Main Street" and row["sub_street"] == "Main Street/0"
    rejects = [json.loads(x) for x in DatasetPaths(out).rejects.read_text().splitlines()]
    by_image = {r["image"]: r for r in rejects}
    assert by_image["nogps.jpg"]["reason"] == "no_exif_gps" and by_image["nogps.jpg"]["field"] == "exif"
    if not heif:
        assert by_image["iphone.heic"]["reason"] == "no_exif_gps" and "pillow-heif" in by_image["iphone.heic"]["detail"]
    report = json.loads(DatasetPaths(out).report.read_text())
    assert report["gps_source"] == "exif" and report["rejected"].get("no_exif_gps") == 1 + int(not heif)
    assert report["input_rows"] == report["kept"] + report["rejected_total"]
    # rows are the sorted walk: every photo has a distinct row number
    assert len(set(df["source_row"]) | {r["row"] for r in rejects}) == report["input_rows"]
    assert json.loads(DatasetPaths(out).info.read_text())["gps_table"] == "exif"


def test_rotated_photo_is_stored_upright(phones):
    photos, out, rotated, _ = phones
    stored = DatasetPaths(out).images / "sideways" / "r.png"
    assert not stored.samefile(rotated)  # a new upright file, not a link to the sideways original
    with Image.open(rotated) as src, Image.open(stored) as dst:
        assert src.size == (30, 10) and dst.size == (10, 30)
        assert exif_gps.exif_orientation(dst) == 1  # no reader will rotate it a second time
        np.testing.assert_array_equal(np.asarray(dst.convert("RGB")), np.asarray(ImageOps.exif_transpose(src).convert("RGB")))
    report = json.loads(DatasetPaths(out).report.read_text())
    assert report["images_rotated"] == 1
    # an upright photo is still a hard link to the original
    assert (DatasetPaths(out).images / "000.jpg").samefile(photos / "000.jpg")


def test_chunked_build_equals_one_chunk(tmp_path):
    images, table, network, expected, n_good = make_inputs(tmp_path)
    outs = {}
    for rows in ("3", "1000"):
        outs[rows] = tmp_path / f"ds{rows}"
        assert main(_argv(images, table, network, outs[rows], "--city", "Toytown", "--min-points", "3",
                          "--chunk-rows", rows)) == 0
    a, b = read_records(outs["3"]), read_records(outs["1000"])
    pd.testing.assert_frame_equal(a, b)
    ra, rb = (DatasetPaths(o).rejects.read_text() for o in outs.values())
    assert ra == rb
    assert {json.loads(x)["row"]: json.loads(x)["reason"] for x in ra.splitlines()} == {k: v[0] for k, v in expected.items()}


def test_check_chunk_is_pure(tmp_path):
    """Same chunk in, same result out, and no file system: the images need not exist."""
    net = load_street_network(write_osm(tmp_path / "toy.osm"))
    geocoder = ReverseGeocoder(net)
    pts = [lonlat(200, 3), lonlat(200, 150), lonlat(101, 70)]
    table = pd.DataFrame({"row": [1, 2, 3], "image": ["nowhere/a.jpg", "b.jpg", "/abs.jpg"],
                          "lat": [f"{p[1]:.8f}" for p in pts], "lon": [f"{p[0]:.8f}" for p in pts],
                          "caption": [None] * 3, "image_id": [None] * 3})
    before = table.copy()
    r1, r2 = check_chunk(table, geocoder), check_chunk(table, geocoder)
    pd.testing.assert_frame_equal(table, before)  # the input is not modified
    assert list(r1.image) == ["nowhere/a.jpg"] and list(r1.street) == ["Main Street"]
    assert sorted((r["row"], r["reason"]) for r in r1.rejects) == [(2, "far_from_street"), (3, "unsafe_path")]
    for f in r1.FIELDS:
        np.testing.assert_array_equal(getattr(r1, f), getattr(r2, f))
    assert r1.rejects == r2.rejects


def test_symlinks_out_of_the_root_are_unsafe_and_root_mode_links_the_folder(tmp_path):
    images, table, network, *_ = make_inputs(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (5, 5), (1, 2, 3)).save(outside / "x.png")
    (images / "link.png").symlink_to(outside / "x.png")
    (images / "linkdir").symlink_to(outside, target_is_directory=True)
    lon, lat = lonlat(200, 3)
    with table.open("a") as f:  # appended after the malformed last line: rows n+1, n+2
        f.write(f"link.png,{lat:.8f},{lon:.8f},\nlinkdir/x.png,{lat:.8f},{lon:.8f},\n")
    n = len(table.read_text().splitlines()) - 1
    out = tmp_path / "ds"
    assert main(_argv(images, table, network, out, "--image-mode", "root", "--image-check", "none")) == 0
    rejects = {json.loads(x)["row"]: json.loads(x) for x in DatasetPaths(out).rejects.read_text().splitlines()}
    assert rejects[n - 1]["reason"] == "unsafe_path" and rejects[n]["reason"] == "unsafe_path"
    paths = DatasetPaths(out)
    assert paths.images.is_symlink() and paths.images.resolve() == images.resolve()
    df = read_records(out)
    assert all((paths.images / r).is_file() for r in df["image"])
    # --image-check none reads no file: the truncated image and the copied content are kept
    assert {"west/broken.png", "copy.png"} <= set(df["image"])


def test_no_neighbourhood_and_no_city_never_render_the_street(tmp_path):
    a = Address("8th Street", "8th Street/0", ("A Avenue",), "", "Springfield")
    assert render_address(a, "neighbourhood") == "Springfield"
    assert render_address(Address("8th Street", "8th Street/0"), "neighbourhood") == ""
    assert render_address(Address("8th Street", "8th Street/0", (), "Oakland", "Pittsburgh"), "neighbourhood") == "Oakland, Pittsburgh"

    images, table, _, _, n_good = make_inputs(tmp_path)
    network = write_osm(tmp_path / "noplaces.osm", places=())  # no place nodes at all
    out = tmp_path / "ds"
    assert main(_argv(images, table, network, out, "--min-points", "3")) == 0
    df = read_records(out)
    assert len(df) == n_good and (df["neighbourhood"] == "").all() and (df["city"] == "").all()
    assert (df["address_neighbourhood"] == "").all()
    assert not any(s in v for v in df["address_full"] for s in ("Westside", "Eastside"))
    report = json.loads(DatasetPaths(out).report.read_text())
    assert report["sub_streets_without_neighbourhood"] == report["sub_streets"] > 0
    assert report["city_source"] == "none"
    assert any("no city" in w for w in report["warnings"]) and any("no neighbourhood" in w for w in report["warnings"])
    s = summary(out)
    assert s["warnings"] == report["warnings"] and "warning" in format_summary(s)

    # the conversation builder asks no "place" question without a neighbourhood (and does with one)
    assert _place_turns(out) == 0
    with_hood = tmp_path / "hood"
    assert main(_argv(images, table, write_osm(tmp_path / "toy.osm"), with_hood, "--min-points", "3")) == 0
    assert _place_turns(with_hood) > 0


def _place_turns(dataset) -> int:
    from conversations.build import build
    from conversations.config import BuildConfig

    out = dataset.parent / f"{dataset.name}_conv"
    build(BuildConfig(dataset=str(dataset), out=str(out), type_weights="place=5,street=1", min_turns=1, max_turns=2))
    records = json.loads((out / "train.json").read_text())
    assert records
    return sum(t == "place" for r in records for t in r["turn_types"])
