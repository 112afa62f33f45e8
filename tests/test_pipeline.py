"""The main job (`address-llava demo`) end to end at a tiny size: every stage runs, writes what the next
stage reads, and a second invocation resumes by skipping the finished stages."""

import json

from llava_address import pipeline

TINY = ["--num-images", "300", "--image-size", "64", "--clip-model", "addressclip-tiny", "--clip-epochs", "1",
        "--llava-config", "tiny-llava", "--base-steps", "2", "--align-steps", "2", "--lora-steps", "2",
        "--eval-questions", "6"]


def test_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert pipeline.main(["--out", str(out), *TINY]) == 0
    for stage in pipeline.STAGES:
        marker = json.loads((out / ".done" / f"{stage}.json").read_text())
        assert marker["config"]["num_images"] == 300
    assert (out / "dataset" / "records.parquet").exists()
    assert (out / "clip" / "hf" / "vision_tower" / "config.json").exists()
    assert (out / "llava" / "merged" / "config.json").exists()
    table = (out / "benchmark" / "benchmark.md").read_text()
    for system in ("ours", "base_llava_untuned", "addressclip_retrieval"):
        assert system in table
    printed = capsys.readouterr().out
    assert "$ address-llava train-clip" in printed and "| AddressCLIP (ours) |" in printed

    assert pipeline.main(["--out", str(out), *TINY]) == 0
    again = capsys.readouterr().out
    assert again.count("already done") == len(pipeline.STAGES)
    assert "$ address-llava" not in again


def test_demo_refuses_unknown_stage():
    import pytest

    with pytest.raises(ValueError, match="valid stages"):
        pipeline.main(["--until", "nope"])
