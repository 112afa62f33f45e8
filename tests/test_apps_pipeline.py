"""The main job (`address-llava demo`) end to end at a tiny size: every stage runs, writes what the next
stage reads, and a second invocation resumes by skipping the finished stages; the same on a hand-made city."""

import json

import pytest
from transformers import AutoTokenizer

from llava_address.apps import pipeline
from llava_address.prompting import VICUNA_V1_SYSTEM

TINY = ["--num-images", "300", "--image-size", "64", "--clip-model", "addressclip-tiny", "--clip-epochs", "1",
        "--llava-config", "tiny-llava", "--base-steps", "2", "--align-steps", "2", "--tune-steps", "2",
        "--eval-questions", "6", "--top-k", "3"]
SYSTEMS = ("ours", "ours_candidates", "base", "addressclip_retrieval")


def test_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert pipeline.main(["--out", str(out), *TINY]) == 0
    for stage in pipeline.STAGES:
        marker = json.loads((out / ".done" / f"{stage}.json").read_text())
        assert marker["config"]["num_images"] == 300
    assert (out / "dataset" / "records.parquet").exists()
    assert (out / "clip" / "hf" / "vision_tower" / "config.json").exists()
    assert (out / "candidates" / "candidates.jsonl").exists()
    assert (out / "llava" / "merged" / "config.json").exists()
    table = (out / "benchmark" / "benchmark.md").read_text()
    for system in SYSTEMS:
        assert f"| {system} |" in table
    assert "failed" not in table
    # the base model's data names no address; half of the address conversations carry candidates
    base_data = (out / "conversations_captions" / "train.json").read_text()
    assert "Candidate addresses" not in base_data and '"scene"' in base_data
    info = json.loads((out / "conversations" / "build_info.json").read_text())
    assert 0 < info["train"]["with_candidates"] < info["train"]["records"]
    # one question per training conversation (no answer copied from an earlier turn), three per image
    assert info["train"]["turns"] == info["train"]["records"] == 3 * info["train"]["images"]
    # the tokenizer learnt the prompt the LLM reads in every sample (system prompt, roles), not only the turns
    tokenizer = AutoTokenizer.from_pretrained(out / "llava" / "tokenizer")
    system_ids = tokenizer(VICUNA_V1_SYSTEM, add_special_tokens=False).input_ids
    assert len(system_ids) <= 1.5 * len(VICUNA_V1_SYSTEM.split())
    assert len(tokenizer(" ASSISTANT:", add_special_tokens=False).input_ids) <= 2
    printed = capsys.readouterr().out
    assert "$ address-llava train-clip" in printed and "| AddressCLIP (ours) |" in printed
    assert "$ address-llava candidates" in printed

    assert pipeline.main(["--out", str(out), *TINY]) == 0
    again = capsys.readouterr().out
    assert again.count("already done") == len(pipeline.STAGES)
    assert "$ address-llava" not in again

    # --force re-trains a finished stage from scratch (its resumable run folder is cleared, not continued)
    (out / "clip" / "stale.txt").write_text("from the earlier run")
    assert pipeline.main(["--out", str(out), *TINY, "--force", "--until", "clip"]) == 0
    assert not (out / "clip" / "stale.txt").exists()
    # ... and every later stage, which read the earlier model, is forgotten: markers and resumed outputs
    assert sorted(m.stem for m in (out / ".done").glob("*.json")) == ["city", "clip", "dataset"]
    assert not (out / "candidates").exists() and not (out / "llava").exists() and not (out / "benchmark").exists()
    steps = [json.loads(line)["step"] for line in (out / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one run's log, not two


def _grid_network(path):
    """A hand-made 3 x 3 grid of named streets (~600 m) with a town and two neighbourhood nodes, as GeoJSON."""
    from pyproj import Transformer

    to_wgs = Transformer.from_crs(32633, 4326, always_xy=True)

    def pt(x, y):
        return list(to_wgs.transform(500000 + x, 5500000 + y))

    feats = []
    for i, name in enumerate(("Aster Road", "Birch Road", "Cedar Road")):
        feats.append({"type": "Feature", "properties": {"name": name, "highway": "residential"},
                      "geometry": {"type": "LineString", "coordinates": [pt(x, 200 * i) for x in range(-100, 601, 100)]}})
    for i, name in enumerate(("First Street", "Second Street", "Third Street")):
        feats.append({"type": "Feature", "properties": {"name": name, "highway": "tertiary"},
                      "geometry": {"type": "LineString", "coordinates": [pt(250 * i, y) for y in range(-100, 501, 100)]}})
    for name, place, xy in (("Gridton", "town", (250, 200)), ("Westend", "neighbourhood", (50, 200)),
                            ("Eastend", "neighbourhood", (450, 200))):
        feats.append({"type": "Feature", "properties": {"name": name, "place": place},
                      "geometry": {"type": "Point", "coordinates": pt(*xy)}})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_demo_runs_on_another_network(tmp_path, capsys):
    network = _grid_network(tmp_path / "grid.geojson")
    out = tmp_path / "grid_demo"
    assert pipeline.main(["--out", str(out), *TINY, "--network", str(network), "--city", "Gridton"]) == 0
    info = json.loads((out / "dataset" / "dataset_info.json").read_text())
    assert info["city"] == "Gridton"
    import pandas as pd

    records = pd.read_parquet(out / "dataset" / "records.parquet")
    assert set(records["street"]) <= {"Aster Road", "Birch Road", "Cedar Road", "First Street", "Second Street",
                                      "Third Street"}
    assert records["sub_street"].nunique() > 6
    table = (out / "benchmark" / "benchmark.md").read_text()
    assert all(f"| {s} |" in table for s in SYSTEMS) and "failed" not in table
    assert f"--network {network}" in capsys.readouterr().out


def test_demo_refuses_unknown_stage(capsys):
    assert pipeline.main(["--until", "nope"]) == 2  # a config error: one line, exit status 2
    assert "valid stages" in capsys.readouterr().err


def test_demo_refuses_conversations_without_turns(capsys):
    assert pipeline.main(["--max-turns", "0"]) == 2
    assert "--max-turns" in capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [
    (["--type-weights", "street=1,nope=2"], "nope"),
    (["--clip-model", "no-such-clip"], "no-such-clip"),
    (["--llava-config", "no-such-shape"], "no-such-shape"),
    (["--folds", "1"], "--folds"),
    (["--top-k", "0"], "--top-k"),
    (["--candidate-fraction", "1.5"], "candidate_fraction"),
    (["--tune-lr", "fast"], "--tune-lr"),
    (["--tune-steps", "0"], "--tune-steps"),
])
def test_demo_checks_every_stage_option_before_the_first_stage(flags, named, tmp_path, capsys):
    out = tmp_path / "demo"
    assert pipeline.main(["--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before the city stage wrote anything
