"""scripts/bench_build.py runs end to end at a tiny size (its correctness checks run; the speed and memory
targets are read from its printed table, never asserted here)."""

from __future__ import annotations

import json

from tests.script_loader import load_script


def test_bench_build_runs_the_real_command_at_a_tiny_size(tmp_path, capsys):
    bench = load_script("bench_build")
    out = tmp_path / "bench.json"
    assert bench.main(["--sizes", "800,1500", "--workdir", str(tmp_path / "work"), "--chunk-rows", "500",
                       "--workers", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["rows"] for r in results] == [800, 1500]
    for r in results:
        assert 0.8 * r["rows"] < r["kept"] <= r["rows"] and r["wall_s"] > 0 and r["peak_mb"] > 0
        assert {"table_geocode", "images", "sub_streets", "write", "total"} <= set(r["stages_s"])
    assert len(list((tmp_path / "work" / "images").rglob("*.jpg"))) == 1500  # one real (empty) file per row
    printed = capsys.readouterr().out
    assert "| 1,500 |" in printed and "targets: 1M rows" in printed
