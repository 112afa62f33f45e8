"""The benchmark scripts run end to end on tiny settings (they assert their own correctness checks;
their speed targets are read from their printed tables, never asserted here)."""

from __future__ import annotations

import json

import pytest
from tests.script_loader import load_script


@pytest.mark.filterwarnings("ignore:No pretrained weights")
def test_bench_clip_runs_every_step_kind_and_the_gallery(tmp_path, capsys):
    bench = load_script("bench_clip")
    out = tmp_path / "bench.json"
    assert bench.main(["--model", "addressclip-tiny", "--batch-size", "8", "--threads", "1", "--warmup", "1",
                       "--rounds", "1", "--steps-per-round", "1", "--candidates", "300", "--queries", "2",
                       "--reencode-queries", "1", "--no-memory", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["train"]) == set(bench.TRAIN_KINDS)
    assert result["train_ratio_vs_plain"]["plain"] == 1.0
    assert all(v["images_per_s"] > 0 for v in result["train"].values())
    assert result["gallery"]["cached_query_s"] < result["gallery"]["reencode_query_s"]
    for label in bench.TRAIN_LABELS.values():
        assert label in printed
    assert "target >= 0.95x plain" in printed and "speed-up" in printed


def test_bench_infer_compares_our_engine_with_the_pipeline_loop(tmp_path, capsys):
    bench = load_script("bench_infer")
    out = tmp_path / "bench.json"
    assert bench.main(["--questions", "4", "--batch-size", "2", "--max-new-tokens", "3", "--repeats", "1",
                       "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    s = json.loads(out.read_text())["summary"]
    assert s["ours_answers_per_s"] > 0 and s["pipeline_answers_per_s"] > 0 and s["ours_peak_memory_mb"] > 0
    assert s["same_answers"] == 1.0  # same prompt (the saved chat template), same greedy decoding
    assert "transformers pipeline, one at a time" in printed and "target >= 2x" in printed
