"""build-dataset writes the realised split fractions into build_report.json and warns (report, dataset_info and
stderr) when a geographically disjoint split comes out far from the request."""

from __future__ import annotations

import json

import numpy as np

from clip_stage.data.build import main
from clip_stage.data.splits import SplitConfig, split_fractions
from clip_stage.core.schema import DatasetPaths, read_info, read_records
from tests.test_data_build import _argv, make_inputs


def test_split_fractions_warn_only_when_far_from_the_request():
    geo = SplitConfig(split="geo", val_fraction=0.1, test_fraction=0.2)
    fr, warn = split_fractions({"train": 70, "val": 10, "test": 20}, geo)
    assert fr["realised"] == {"train": 0.7, "val": 0.1, "test": 0.2} and fr["requested"]["train"] == 0.7 and not warn
    fr, warn = split_fractions({"train": 21, "val": 10, "test": 69}, geo)  # the 69% test for 20% asked
    assert fr["realised"]["test"] == 0.69 and len(warn) == 1 and "test holds 69%" in warn[0] and "20% asked" in warn[0]
    _, warn = split_fractions({"train": 76, "val": 0, "test": 24}, geo)  # val empty for 10% asked
    assert len(warn) == 1 and warn[0].startswith("geo split: val holds 0%")
    _, warn = split_fractions({"train": 21, "val": 10, "test": 69}, SplitConfig(split="random"))
    assert not warn  # the random split is stratified per sub-street: its fractions are reported, not warned about


def test_lopsided_geo_split_is_reported_and_warned(tmp_path, capsys):
    images, table, network, *_ = make_inputs(tmp_path)
    out = tmp_path / "geo"
    # 1 km tiles over a ~500 m network: two tiles, so the held-out one carries about half of the images
    assert main(_argv(images, table, network, out, "--split", "geo", "--tile-size-m", "1000", "--val-fraction", "0",
                      "--test-fraction", "0.2")) == 0
    report = json.loads(DatasetPaths(out).report.read_text())
    df = read_records(out)
    realised = report["split_fractions"]["realised"]
    assert realised["test"] == round(float((df["split"] == "test").mean()), 6) and realised["test"] > 0.3
    assert report["split_fractions"]["requested"] == {"train": 0.8, "val": 0.0, "test": 0.2}
    warned = [w for w in report["warnings"] if w.startswith("geo split: test")]
    assert len(warned) == 1 and warned[0] in read_info(out)["warnings"]
    assert f"build-dataset: warning: {warned[0]}" in capsys.readouterr().err

    # small tiles: the request is met closely and nothing is said
    out2 = tmp_path / "geo_fine"
    assert main(_argv(images, table, network, out2, "--split", "geo", "--tile-size-m", "40", "--val-fraction", "0",
                      "--test-fraction", "0.3")) == 0
    report = json.loads(DatasetPaths(out2).report.read_text())
    assert abs(report["split_fractions"]["realised"]["test"] - 0.3) <= 0.15
    assert not [w for w in report["warnings"] if w.startswith("geo split")] and "geo split" not in capsys.readouterr().err
    assert np.isclose(sum(report["split_fractions"]["realised"].values()), 1.0)
