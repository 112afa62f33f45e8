"""scripts/bench_tower_features.py: a measurement is reused only for the same settings; a demo without its
conversations or base model is one line."""

from __future__ import annotations

from llava_address.apps.pipeline import DemoConfig
from tests.script_loader import load_script


def test_each_setting_gets_its_own_folder_so_no_result_is_reused_for_other_settings(tmp_path):
    folder = load_script("bench_tower_features").combination_folder
    base = folder(tmp_path, -1, "full", DemoConfig(align_steps=60, tune_steps=300), 200)
    assert base == folder(tmp_path, -1, "full", DemoConfig(align_steps=60, tune_steps=300), 200)
    assert len({base, folder(tmp_path, -1, "full", DemoConfig(align_steps=60, tune_steps=700), 200),
                folder(tmp_path, -1, "full", DemoConfig(align_steps=60, tune_steps=300), 100),
                folder(tmp_path, -2, "full", DemoConfig(align_steps=60, tune_steps=300), 200),
                folder(tmp_path, -1, "default", DemoConfig(align_steps=2, tune_steps=300), 200)}) == 5


def test_a_demo_without_its_base_model_is_named_in_one_line(tmp_path, capsys):
    (tmp_path / ".done").mkdir()
    (tmp_path / ".done" / "conversations.json").write_text("{}")
    assert load_script("bench_tower_features").main(["--demo", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench_tower_features: error: ") and "llava/base" in err and len(err.splitlines()) == 1
