"""The toolkit's skeleton: the console command, the shared dataset schema and the safe-path rules."""

import subprocess
import sys

import pytest

from clip_stage.core import schema
from clip_stage.core.fs import UnsafePathError, atomic_dir, resolve_under_root
from llava_address.apps import cli


def test_every_command_resolves_to_a_main_function():
    for name, command in cli.COMMANDS.items():
        func = cli._resolve(command.target)
        assert callable(func), name


def test_cli_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "build-dataset" in out and "train-clip" in out


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "llava_address.apps.cli", "--help"], capture_output=True, text=True, check=True)
    assert "address-llava" in out.stdout


def test_duplicate_command_refused():
    with pytest.raises(ValueError, match="already registered"):
        cli.register_command("demo", "x:y", "dup")


def test_address_styles_render_from_one_record():
    a = schema.Address("Forbes Avenue", "Forbes Avenue/2", ("Craig Street", "Bellefield Avenue"), "Oakland", "Pittsburgh")
    assert schema.render_address(a, "full") == "Forbes Avenue between Craig Street and Bellefield Avenue, Oakland, Pittsburgh"
    assert schema.render_address(a, "canonical") == "Forbes Avenue, Oakland (Craig Street & Bellefield Avenue)"
    assert schema.render_address(a, "intersection") == "Forbes Avenue & Craig Street, Oakland"
    assert schema.render_address(a, "street") == "Forbes Avenue"
    dead_end = schema.Address("Forbes Avenue", "Forbes Avenue/9", ("Craig Street",), "Oakland", "Pittsburgh")
    assert schema.render_address(dead_end, "sub_street") == "Forbes Avenue near Craig Street"
    with pytest.raises(KeyError, match=r"unknown address style 'nope'; valid: \["):
        schema.render_address(a, "nope")


def test_toy_dataset_follows_schema(toy_dataset):
    df = schema.read_records(toy_dataset)
    assert set(df["split"]) == {"train", "test"}
    assert df["sub_street"].nunique() == 9
    test = schema.read_records(toy_dataset, "test")
    assert set(test["sub_street"]) == set(df["sub_street"])
    subs = schema.read_sub_streets(toy_dataset)
    assert {s["sub_street"] for s in subs} == set(df["sub_street"])
    assert schema.read_info(toy_dataset)["utm_epsg"] == 32635


def test_resolve_under_root_refuses_escapes(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(b"x")
    assert resolve_under_root(root, "a.png") == (root / "a.png").resolve()
    for bad in ("../secret.png", "/etc/passwd", "sub/../../x.png", ""):
        with pytest.raises(UnsafePathError):
            resolve_under_root(root, bad)
    (tmp_path / "outside.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(UnsafePathError):
        resolve_under_root(root, "link.png")


def test_atomic_dir_keeps_old_folder_on_failure(tmp_path):
    target = tmp_path / "ds"
    with atomic_dir(target) as tmp:
        (tmp / "f.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "f.txt").write_text("two")
            raise RuntimeError("killed")
    assert (target / "f.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_atomic_dir_clears_its_own_killed_staging_only_and_takes_dot(tmp_path, monkeypatch):
    (tmp_path / ".conv.ab12cd34.tmp").mkdir()  # a killed write of conv
    (tmp_path / ".conv.geo.ab12cd34.tmp").mkdir()  # conv.geo being written right now
    with atomic_dir(tmp_path / "conv") as tmp:
        (tmp / "f.txt").write_text("one")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".conv.geo.ab12cd34.tmp", "conv"]
    monkeypatch.chdir(tmp_path / "conv")
    with atomic_dir(".") as tmp:  # --out . from inside the folder
        (tmp / "f.txt").write_text("two")
    assert (tmp_path / "conv" / "f.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".conv.geo.ab12cd34.tmp", "conv"]


def test_atomic_outputs_get_the_umask_mode_not_owner_only(tmp_path):
    """mkstemp/mkdtemp make 0600/0700 files; outputs (a merged model, a report) must be as readable as any file
    the user creates."""
    import os
    import stat

    from clip_stage.core.fs import atomic_write_text

    import torch
    from safetensors.torch import save_file

    from clip_stage.query_map import save_figure

    private_input = tmp_path / "photo.png"
    private_input.write_bytes(b"png")
    private_input.chmod(0o600)
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            atomic_write_text(tmp / "config.json", "{}")
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600 files
            os.link(private_input, tmp / "image.png")  # a dataset's hard link is the user's file: left alone
        atomic_write_text(tmp_path / "report.json", "{}")
        import matplotlib.pyplot as plt

        fig = plt.figure()
        save_figure(fig, tmp_path / "map.png")
        plt.close(fig)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    for name in ("model/config.json", "model/model.safetensors", "report.json", "map.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE(private_input.stat().st_mode) == 0o600


def test_records_without_labels_or_with_unknown_splits_are_refused(toy_dataset, tmp_path):
    """A dataset whose rows have no sub-street label or an unknown split would be scored 0% with no word why."""
    import shutil

    from clip_stage.core.schema import DatasetFormatError, read_records, write_records

    data = tmp_path / "ds"
    shutil.copytree(toy_dataset, data)
    good = read_records(data)
    for column, value, message in (("sub_street", None, "field 'sub_street' is empty"),
                                   ("split", "validation", "field 'split' is 'validation'")):
        bad = good.copy()
        bad.loc[2:4, column] = value
        write_records(bad, data / "records.parquet")
        with pytest.raises(DatasetFormatError, match=rf"record 2 \(image_id=.*\): {message}.*2 more rows"):
            read_records(data)
