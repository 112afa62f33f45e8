"""The published-dataset loader (`load-ial`): small files written in the AddressCLIP release layout."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from pyproj import Transformer

from clip_stage.data import ial

from clip_stage.core import schema
from llava_address.apps import cli

EPSG = 32617  # Pittsburgh
# (key, caption, verbose, canonical, lat, lon): a few real-looking Oakland points
GOOD = [
    ("Pitts-IAL/000/000001_pitch1_yaw1.jpg", "a street view of a brick church", "4200 Fifth Avenue, Oakland, Pittsburgh, PA",
     "Forbes Avenue & Craig Street, Oakland", 40.44431, -79.95322),
    ("Pitts-IAL/000/000002_pitch1_yaw2.jpg", "a street view of a bus stop", "4210 Forbes Avenue, Oakland, Pittsburgh, PA",
     "Forbes Avenue & Craig Street, Oakland", 40.44445, -79.95290),
    ("Pitts-IAL/000/000003_pitch1_yaw3.jpg", "a street view of a campus", "4400 Forbes Avenue, Oakland, Pittsburgh, PA",
     "Forbes Avenue & Bellefield Avenue, Oakland", 40.44390, -79.95110),
    ("Pitts-IAL/001/000004_pitch2_yaw1.jpg", "a street view of a parking lot", "300 Craig Street, Oakland, Pittsburgh, PA",
     "Craig Street, Shadyside", 40.44700, -79.94920),
]
TEST_ONLY = ("Pitts-IAL/001/000005_pitch2_yaw2.jpg", "a street view of shops", "4220 Forbes Avenue, Oakland",
             "Forbes Avenue & Craig Street, Oakland", 40.44440, -79.95300)


def _write_release(root, *, header=True, extra_train=None, extra_coords=()):
    """Writes images/, annotations/{train,test}.json and coords.csv; returns (ann_dir, coords, image_root)."""
    fwd = Transformer.from_crs("EPSG:4326", f"EPSG:{EPSG}", always_xy=True)
    image_root = root / "datasets" / "Pitts-IAL"
    for i, (key, *_rest) in enumerate([*GOOD, TEST_ONLY]):
        p = image_root / key.split("/", 1)[1]  # keys repeat the top folder the image root already is
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(p, format="JPEG")
    ann = root / "annotations"
    ann.mkdir()
    train = {k: [c, v, can] for k, c, v, can, _, _ in GOOD}
    train.update(extra_train or {})
    test = {TEST_ONLY[0]: list(TEST_ONLY[1:4])}
    (ann / "train.json").write_text(json.dumps(train), encoding="utf-8")
    (ann / "test.json").write_text(json.dumps(test), encoding="utf-8")
    lines = ["filename,easting,northing"] if header else []
    for key, *_x, lat, lon in [*GOOD, TEST_ONLY]:
        e, n = fwd.transform(lon, lat)
        # the CSV gives base names only: matched to annotation keys by base name
        lines.append(f"{key.rsplit('/', 1)[1]},{e:.3f},{n:.3f}")
    lines += list(extra_coords)
    coords = root / "coords.csv"
    coords.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ann, coords, image_root


def _cfg(**kw):
    return ial.IALConfig(city="Pittsburgh", utm_epsg=EPSG, **kw)


def test_parse_canonical_forms():
    assert ial.parse_canonical("Forbes Avenue & Craig Street, Oakland") == ("Forbes Avenue", ("Craig Street",), "Oakland")
    assert ial.parse_canonical("A Street & B Road & C Lane, North Side, Pittsburgh") == ("A Street", ("B Road", "C Lane"), "North Side")
    assert ial.parse_canonical("Craig Street, Shadyside") == ("Craig Street", (), "Shadyside")
    assert ial.parse_canonical("Forbes Avenue between Craig Street and Bellefield Avenue, Oakland") == (
        "Forbes Avenue", ("Craig Street", "Bellefield Avenue"), "Oakland")
    assert ial.parse_canonical("Market Street near 5th Street") == ("Market Street", ("5th Street",), "")
    for bad in ("", " & Craig Street, Oakland", ", Oakland"):
        with pytest.raises(ValueError, match="cannot parse"):
            ial.parse_canonical(bad)


def test_split_from_file_name(tmp_path):
    assert ial.split_of(tmp_path / "train.json", {}) == "train"
    assert ial.split_of(tmp_path / "Pitts_IAL_test.json", {}) == "test"
    assert ial.split_of(tmp_path / "valid.json", {}) == "val"
    assert ial.split_of(tmp_path / "gallery.json", {"gallery.json": "train"}) == "train"
    with pytest.raises(ial.IALFormatError, match="gallery.json"):
        ial.split_of(tmp_path / "gallery.json", {})


def test_load_ial_converts_the_release_layout(tmp_path):
    ann, coords, image_root = _write_release(tmp_path)
    out = tmp_path / "dataset"
    report = ial.load_ial([ann], coords, image_root, out, _cfg())
    df = schema.read_records(out)
    assert report["kept"] == len(df) == 5 and report["rejected_total"] == 0
    assert sorted(df["split"]) == ["test", "train", "train", "train", "train"]
    # lat/lon come back from UTM
    by_name = {r.image.rsplit("/", 1)[1]: r for r in df.itertuples()}
    for key, _c, verbose, canonical, lat, lon in [*GOOD, TEST_ONLY]:
        r = by_name[key.rsplit("/", 1)[1]]
        assert math.isclose(r.lat, lat, abs_tol=1e-6) and math.isclose(r.lon, lon, abs_tol=1e-6)
        assert r.address_full == verbose and r.address_canonical == canonical
        assert (image_root / r.image).is_file()
    # structured fields parsed out of the canonical address; one sub-street per canonical address
    forbes = df[df["address_canonical"] == "Forbes Avenue & Craig Street, Oakland"]
    assert set(forbes["street"]) == {"Forbes Avenue"} and forbes["sub_street"].nunique() == 1
    assert list(forbes["cross_streets"].iloc[0]) == ["Craig Street"] and set(forbes["neighbourhood"]) == {"Oakland"}
    assert df["sub_street"].nunique() == 3
    assert df.loc[df["street"] == "Forbes Avenue", "sub_street"].nunique() == 2
    assert set(df["city"]) == {"Pittsburgh"}
    assert set(df["address_sub_street"]) >= {"Forbes Avenue near Craig Street", "Craig Street"}
    # images/ resolves to the image root: every record's image opens through the dataset folder
    for rel in df["image"]:
        with Image.open(out / "images" / rel) as im:
            assert im.size == (8, 8)
    subs = schema.read_sub_streets(out)
    assert {s["sub_street"] for s in subs} == set(df["sub_street"])
    assert sum(s["n_images"] for s in subs) == len(df)
    info = schema.read_info(out)
    assert info["utm_epsg"] == EPSG and info["city"] == "Pittsburgh"
    assert (out / schema.REJECTS_FILE).read_text() == ""


def test_bad_rows_are_rejected_with_reasons(tmp_path):
    extra = {
        "Pitts-IAL/002/malformed.jpg": ["only a caption", "and a verbose address"],
        "Pitts-IAL/002/not_a_list.jpg": "Forbes Avenue & Craig Street, Oakland",
        "Pitts-IAL/002/no_street.jpg": ["cap", "verbose", " & Craig Street, Oakland"],
        "Pitts-IAL/002/no_coords.jpg": ["cap", "verbose", "Forbes Avenue & Craig Street, Oakland"],
        "Pitts-IAL/002/nan_coords.jpg": ["cap", "verbose", "Forbes Avenue & Craig Street, Oakland"],
        "Pitts-IAL/002/text_coords.jpg": ["cap", "verbose", "Forbes Avenue & Craig Street, Oakland"],
        "Pitts-IAL/002/far.jpg": ["cap", "verbose", "Forbes Avenue & Craig Street, Oakland"],
        "Pitts-IAL/002/missing_image.jpg": ["cap", "verbose", "Forbes Avenue & Craig Street, Oakland"],
        "Pitts-IAL/../../escape/x.jpg": ["cap", "verbose", "Forbes Avenue & Craig Street, Oakland"],
        # the same image listed twice (under another spelling of its path): kept once
        "./Pitts-IAL/000/000001_pitch1_yaw1.jpg": ["cap", "verbose", "Forbes Avenue & Craig Street, Oakland"],
    }
    ann, coords, image_root = _write_release(
        tmp_path, extra_train=extra,
        extra_coords=("nan_coords.jpg,nan,nan", "text_coords.jpg,east,4480000", "missing_image.jpg,585000,4477000",
                      "x.jpg,585000,4477000", "far.jpg,40.44,-79.95"),
    )
    out = tmp_path / "dataset"
    report = ial.load_ial([ann / "train.json", ann / "test.json"], coords, image_root, out, _cfg())
    rejects = [json.loads(line) for line in (out / schema.REJECTS_FILE).read_text().splitlines()]
    reasons = {r["row"].rsplit("/", 1)[1]: r["reason"] for r in rejects}
    assert reasons == {
        "malformed.jpg": "malformed_row", "not_a_list.jpg": "malformed_row", "no_street.jpg": "bad_address",
        "no_coords.jpg": "missing_gps", "nan_coords.jpg": "missing_gps", "text_coords.jpg": "bad_gps",
        "far.jpg": "gps_out_of_range", "missing_image.jpg": "image_not_found", "x.jpg": "unsafe_path",
        "000001_pitch1_yaw1.jpg": "duplicate_path",
    }
    assert all(r["source"].endswith("train.json") for r in rejects)
    fields = {r["row"].rsplit("/", 1)[1]: r["field"] for r in rejects}
    assert fields["text_coords.jpg"] == "coords" and fields["missing_image.jpg"] == "image" and fields["malformed.jpg"] == "entry"
    text_row = next(r for r in rejects if r["row"].endswith("text_coords.jpg"))
    assert "coords.csv: line" in text_row["detail"] and "'east'" in text_row["detail"]
    assert report["kept"] == 5 and report["rejected_total"] == len(rejects) == 10
    assert report["rejected"]["malformed_row"] == 2
    assert json.loads((out / schema.REPORT_FILE).read_text())["rejected"] == report["rejected"]


def test_headerless_csv_and_copied_images(tmp_path):
    ann, coords, image_root = _write_release(tmp_path, header=False)
    out = tmp_path / "dataset"
    ial.load_ial([ann], coords, image_root, out, _cfg(images="copy", verify_images=True))
    df = schema.read_records(out)
    assert len(df) == 5
    assert not (out / "images").is_symlink()
    for rel in df["image"]:
        assert (out / "images" / rel).is_file() and not (out / "images" / rel).is_symlink()


def test_unreadable_image_rejected_when_verifying(tmp_path):
    ann, coords, image_root = _write_release(tmp_path)
    (image_root / GOOD[0][0].split("/", 1)[1]).write_bytes(b"not a jpeg")
    report = ial.load_ial([ann], coords, image_root, tmp_path / "d", _cfg(verify_images=True))
    assert report["rejected"] == {"corrupt_image": 1} and report["kept"] == 4


def test_malformed_json_file_is_a_clear_error_and_writes_nothing(tmp_path):
    ann, coords, image_root = _write_release(tmp_path)
    (ann / "test.json").write_text('{"a.jpg": ["cap", "v", "c"],,}', encoding="utf-8")
    out = tmp_path / "dataset"
    with pytest.raises(ial.IALFormatError, match=r"test\.json: malformed JSON at line 1"):
        ial.load_ial([ann], coords, image_root, out, _cfg())
    assert not out.exists()
    (ann / "test.json").write_text('[["a.jpg", "cap"]]', encoding="utf-8")
    with pytest.raises(ial.IALFormatError, match=r"test\.json: expected a JSON object"):
        ial.load_ial([ann], coords, image_root, out, _cfg())


def test_bad_coordinate_files_name_the_file(tmp_path):
    ann, coords, image_root = _write_release(tmp_path)
    coords.write_text("image,lat,lon\na.jpg,1,2\n", encoding="utf-8")
    with pytest.raises(ial.IALFormatError, match=r"coords\.csv: header .* no easting column"):
        ial.load_ial([ann], coords, image_root, tmp_path / "d", _cfg())
    with pytest.raises(ial.IALFormatError, match=r"nope\.csv: coordinates file not found"):
        ial.load_ial([ann], tmp_path / "nope.csv", image_root, tmp_path / "d", _cfg())


def test_cli_load_ial(tmp_path, capsys):
    ann, coords, image_root = _write_release(tmp_path)
    out = tmp_path / "dataset"
    rc = cli.main(["load-ial", "--annotations", str(ann), "--coords", str(coords), "--image-root", str(image_root),
                   "--out", str(out), "--city", "Pittsburgh", "--utm-epsg", str(EPSG)])
    assert rc == 0
    assert "5 images kept" in capsys.readouterr().out
    assert len(schema.read_records(out, "test")) == 1
    # errors are reported on stderr with the file's name, not as a traceback
    (ann / "train.json").write_text("{", encoding="utf-8")
    rc = ial.main(["--annotations", str(ann), "--coords", str(coords), "--image-root", str(image_root),
                   "--out", str(out), "--city", "Pittsburgh", "--utm-epsg", str(EPSG), "--overwrite"])
    assert rc == 2 and "train.json: malformed JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ial.main(["--annotations", str(ann), "--coords", str(coords), "--image-root", str(image_root),
                  "--out", str(out), "--city", "Pittsburgh", "--utm-epsg", "4326"])


def test_sf_xl_coordinates_from_file_names(tmp_path):
    """Without --coords, SF-XL / CosPlace names '@easting@northing@zone@band@lat@lon@...' give the coordinates."""
    fwd = Transformer.from_crs("EPSG:4326", "EPSG:32610", always_xy=True)
    lat, lon = 37.7749, -122.4194
    e, n = fwd.transform(lon, lat)
    names = {
        "good": f"@{e:.2f}@{n:.2f}@10@S@{lat}@{lon}@pano1@@0@@@@201311@@.jpg",
        "zone": f"@{e:.2f}@{n:.2f}@11@S@{lat}@{lon}@pano2@@0@@@@201311@@.jpg",
        "plain": "000123.jpg",
    }
    root = tmp_path / "processed"
    (root / "train").mkdir(parents=True)
    for name in names.values():
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "train" / name, format="JPEG")
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps({f"train/{v}": ["cap", "Market Street, SoMa", "Market Street & 5th Street, SoMa"]
                               for v in names.values()}))
    out = tmp_path / "sf"
    report = ial.load_ial([ann], None, root, out, ial.IALConfig(city="San Francisco", utm_epsg=32610))
    df = schema.read_records(out)
    assert len(df) == 1 and math.isclose(df["lat"][0], lat, abs_tol=1e-5) and math.isclose(df["lon"][0], lon, abs_tol=1e-5)
    assert df["street"][0] == "Market Street" and list(df["cross_streets"][0]) == ["5th Street"]
    rejects = {r["row"]: r for r in map(json.loads, (out / schema.REJECTS_FILE).read_text().splitlines())}
    assert rejects[f"train/{names['zone']}"]["reason"] == "bad_gps" and "zone 11S" in rejects[f"train/{names['zone']}"]["detail"]
    assert rejects["train/000123.jpg"]["reason"] == "missing_gps"
    assert report["kept"] == 1 and report["rejected_total"] == 2


def test_three_street_intersection_is_not_rendered_as_a_stretch(tmp_path):
    """'Centre Avenue & Negley Avenue & Baum Boulevard, Shadyside' is where three streets meet."""
    assert ial.canonical_form("Centre Avenue & Negley Avenue & Baum Boulevard, Shadyside") == "intersection"
    assert ial.canonical_form("Forbes Avenue between Craig Street and Bellefield Avenue, Oakland") == "between"
    assert ial.canonical_form("Market Street near 5th Street") == "near"
    assert ial.canonical_form("Craig Street, Shadyside") == "street"
    three = "Centre Avenue & Negley Avenue & Baum Boulevard, Shadyside"
    between = "Forbes Avenue between Craig Street and Bellefield Avenue, Oakland"
    extra = {"Pitts-IAL/002/centre_1.jpg": ["cap", "", three],
             "Pitts-IAL/002/centre_2.jpg": ["cap", "5800 Centre Avenue, Shadyside, Pittsburgh, PA", three],
             "Pitts-IAL/002/forbes.jpg": ["cap", "", between]}
    ann, coords, image_root = _write_release(
        tmp_path, extra_train=extra,
        extra_coords=("centre_1.jpg,589500,4480000", "centre_2.jpg,589510,4480005", "forbes.jpg,587000,4477000"))
    (image_root / "002").mkdir()
    for key in extra:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image_root / key.split("/", 1)[1], format="JPEG")
    out = tmp_path / "dataset"
    report = ial.load_ial([ann], coords, image_root, out, _cfg())
    df = schema.read_records(out).set_index("image")
    c1, c2, fb = df.loc["002/centre_1.jpg"], df.loc["002/centre_2.jpg"], df.loc["002/forbes.jpg"]
    assert c1["street"] == "Centre Avenue" and list(c1["cross_streets"]) == ["Negley Avenue", "Baum Boulevard"]
    assert c1["address_sub_street"] == "Centre Avenue & Negley Avenue & Baum Boulevard"
    assert c1["address_full"] == "Centre Avenue & Negley Avenue & Baum Boulevard, Shadyside, Pittsburgh"
    assert c2["address_full"] == "5800 Centre Avenue, Shadyside, Pittsburgh, PA"  # the published verbose wins
    assert c1["address_canonical"] == three and c1["sub_street"] == c2["sub_street"]
    for col in ("address_sub_street", "address_full"):
        assert "between" not in c1[col] and "between" not in c2[col]
    # a published "between" stretch keeps its form
    assert fb["address_sub_street"] == "Forbes Avenue between Craig Street and Bellefield Avenue"
    assert report["multi_street_intersections"] == 1
    sub = next(s for s in schema.read_sub_streets(out) if s["sub_street"] == c1["sub_street"])
    assert sub["address_sub_street"] == "Centre Avenue & Negley Avenue & Baum Boulevard" and sub["n_images"] == 2
    # every later stage re-renders addresses from the record: the intersection form survives that too
    a = schema.Address.from_row(df.reset_index().set_index("image").loc["002/centre_1.jpg"].to_dict() | {"cross_streets": c1["cross_streets"]})
    assert a.junction and schema.render_address(a, "sub_street") == "Centre Avenue & Negley Avenue & Baum Boulevard"
    assert schema.render_address(a, "intersection") == "Centre Avenue & Negley Avenue & Baum Boulevard, Shadyside"
    assert not schema.Address.from_row(fb.to_dict()).junction
    from clip_stage.gallery import gallery_from_dataset

    texts = gallery_from_dataset(out, "full").texts
    assert "Centre Avenue & Negley Avenue & Baum Boulevard, Shadyside, Pittsburgh" in texts
    assert not any(t.startswith("Centre Avenue between") for t in texts)
