"""One rule for output folders (clip_stage.core.outdir), for every command that writes one.

Each command is run through `address-llava` on hostile `--out` values: someone else's folder (with
--overwrite too), an input itself, a folder holding an input, a folder inside one. Every refusal must be one
line on stderr, exit code 2, before any model loads, and delete nothing. Inputs are stand-ins where the
refusal comes before they are read (it must: a refusal after a model load would be slow and could be too late).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clip_stage.core.outdir import MARKER_FILE, OutputFolderError, check_not_input, check_out_dir, on_disk, write_marker
from llava_address.apps import cli


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def foreign(folder: Path) -> Path:
    """A folder of someone's own data (no marker)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "thesis.txt").write_text("keep me")
    return folder


def refused(capsys, argv: list[str], *needles: str) -> str:
    """Runs `address-llava argv`; asserts exit 2 and ONE stderr line, an error naming the refusal (needles)."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's parser.exit(2, message) in some commands
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# --- the helper itself ------------------------------------------------------------------------------------

def test_the_rule(tmp_path):
    assert check_out_dir(tmp_path / "new", "conversations") == "new"
    (tmp_path / "empty").mkdir()
    assert check_out_dir(tmp_path / "empty", "conversations") == "new"
    other = foreign(tmp_path / "other")
    for kw in ({}, {"overwrite": True}, {"resume": True}):  # never someone else's folder
        with pytest.raises(OutputFolderError, match="not a conversations output"):
            check_out_dir(other, "conversations", **kw)
    own = tmp_path / "own"
    own.mkdir()
    write_marker(own, "conversations", note="x")
    assert json.loads((own / MARKER_FILE).read_text())["kind"] == "conversations"
    with pytest.raises(OutputFolderError, match="pass --overwrite"):
        check_out_dir(own, "conversations")
    assert check_out_dir(own, "conversations", overwrite=True) == "replace"
    assert check_out_dir(own, "conversations", resume=True) == "resume"
    with pytest.raises(OutputFolderError, match="holds a conversations output, not a merge one"):
        check_out_dir(own, "merge", overwrite=True)
    # folders written before markers: the command's own files (glob patterns) stand in for the marker
    legacy = tmp_path / "legacy"
    (legacy / "checkpoint-000002").mkdir(parents=True)
    assert check_out_dir(legacy, "train-llava", resume=True, legacy=["checkpoint-*"]) == "resume"
    with pytest.raises(OutputFolderError):
        check_out_dir(legacy, "train-llava", resume=True, legacy=["metrics.jsonl"])
    with pytest.raises(OutputFolderError):  # all of them, not one: an HF Trainer folder has checkpoint-* too
        check_out_dir(legacy, "train-llava", resume=True, legacy=["checkpoint-*", "metrics.jsonl"])
    with pytest.raises(OutputFolderError, match="not replaced on that guess"):  # files may continue a folder, never delete it
        check_out_dir(legacy, "train-llava", overwrite=True, legacy=["checkpoint-*"])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        check_out_dir(tmp_path / "afile", "merge")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MARKER_FILE).write_text("{not json")
    with pytest.raises(OutputFolderError, match="unreadable output marker"):
        check_out_dir(bad, "merge", overwrite=True)


def test_inputs_compared_as_real_paths(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    net = tmp_path / "net.osm"
    net.write_text("<osm/>")
    for out, why in ((data / "images", "is the input"), (data, "contains the input"), (tmp_path, "contains the input"),
                     (data / "images" / "x", "lies inside")):
        with pytest.raises(OutputFolderError, match=why):
            check_out_dir(out, "conversations", inputs=[data / "images", net])
    link = tmp_path / "link"
    link.symlink_to(data, target_is_directory=True)
    with pytest.raises(OutputFolderError, match="is the input"):
        check_not_input(link, [data])
    with pytest.raises(OutputFolderError, match="is the input"):
        check_not_input(net, [net])  # a file --out (infer) equal to an input file
    check_not_input(tmp_path / "beside", [net, data])  # beside the network file, outside the data: fine
    check_not_input(data / "images" / "x", [data], inside_ok=[data])  # a run folder's own export
    with pytest.raises(OutputFolderError, match="is the input"):
        check_not_input(data, [], inside_ok=[data])
    # a model option is protected when it is a path on disk, not when it is a hub id or an open_clip tag
    assert on_disk(str(data)) == str(data) and on_disk("openai") is None and on_disk(None) is None
    with pytest.raises(OutputFolderError, match="is the input"):
        check_not_input(data, [on_disk(str(data))])


# --- stage 1: data ------------------------------------------------------------------------------------------

def test_build_dataset(tmp_path, capsys):
    images = tmp_path / "photos"
    images.mkdir()
    (images / "a.png").write_bytes(b"png")
    gps = tmp_path / "gps.csv"
    gps.write_text("path,latitude,longitude\na.png,60.1,24.9\n")
    net = tmp_path / "net.osm"
    net.write_text("<osm/>")
    before = snapshot(tmp_path)
    base = ["build-dataset", "--images", str(images), "--gps", str(gps), "--network", str(net), "--quiet"]
    refused(capsys, [*base, "--out", str(images), "--overwrite"], "is the input")
    refused(capsys, [*base, "--out", str(tmp_path), "--overwrite"], "contains the input")
    refused(capsys, [*base, "--out", str(images / "ds")], "lies inside")
    refused(capsys, [*base, "--out", str(foreign(tmp_path / "mine")), "--overwrite"], "not a build-dataset output")
    hf_data = tmp_path / "hf_data"  # a LLaMA-Factory / datasets folder also has a dataset_info.json
    hf_data.mkdir()
    (hf_data / "dataset_info.json").write_text("{}")
    (hf_data / "alpaca.json").write_text("[]")
    refused(capsys, [*base, "--out", str(hf_data), "--overwrite"], "not a build-dataset output")
    assert snapshot(tmp_path) == {**before, "mine/thesis.txt": b"keep me", "hf_data/dataset_info.json": b"{}",
                                  "hf_data/alpaca.json": b"[]"}


def test_demo_city(tmp_path, capsys):
    refused(capsys, ["demo-city", "--out", str(foreign(tmp_path / "mine")), "--overwrite"], "not a demo-city output")
    own = tmp_path / "city"
    own.mkdir()
    write_marker(own, "demo-city")
    (own / "gps.csv").write_text("old")
    refused(capsys, ["demo-city", "--out", str(own)], "pass --overwrite")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "keep me" and (own / "gps.csv").read_text() == "old"


def test_load_ial_refuses_the_image_root(tmp_path, capsys):
    root = tmp_path / "Pitts-IAL"
    root.mkdir()
    (root / "photo.jpg").write_bytes(b"jpeg")
    ann = tmp_path / "train.json"
    ann.write_text("{}")
    before = snapshot(tmp_path)
    base = ["load-ial", "--annotations", str(ann), "--image-root", str(root), "--city", "P", "--utm-epsg", "32617"]
    refused(capsys, [*base, "--out", str(root)], "is the input")
    refused(capsys, [*base, "--out", str(tmp_path), "--overwrite"], "contains the input")
    assert snapshot(tmp_path) == before
    write_marker(tmp_path / "ds", "build-dataset")  # a dataset of another command: not replaced
    refused(capsys, [*base, "--out", str(tmp_path / "ds"), "--overwrite"], "holds a build-dataset output")


# --- stage 2: AddressCLIP ----------------------------------------------------------------------------------

def fake_dataset(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "0.png").write_bytes(b"png")
    (folder / "records.parquet").write_bytes(b"PAR1")
    return folder


def test_train_clip(tmp_path, capsys):
    data = fake_dataset(tmp_path / "data")
    before = snapshot(data)
    base = ["train-clip", "--dataset", str(data), "--model", "addressclip-tiny", "--pretrained", "none"]
    refused(capsys, [*base, "--output-dir", str(data), "--resume", "latest"], "is the input")
    refused(capsys, [*base, "--output-dir", str(foreign(tmp_path / "mine"))], "not a train-clip output")
    assert snapshot(data) == before


def test_export_clip(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoint-000001").mkdir(parents=True)
    refused(capsys, ["export-clip", "--checkpoint", str(run), "--out", str(run), "--overwrite"], "is the input")
    refused(capsys, ["export-clip", "--checkpoint", str(run), "--out", str(foreign(tmp_path / "mine")), "--overwrite"],
            "not a export-clip output")
    write_marker(tmp_path / "hf", "export-clip")
    refused(capsys, ["export-clip", "--checkpoint", str(run), "--out", str(tmp_path / "hf")], "pass --overwrite")


def test_candidates(tmp_path, capsys):
    data = fake_dataset(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    base = ["candidates", "--checkpoint", str(run), "--dataset", str(data)]
    refused(capsys, [*base, "--out", str(data / "candidates")], "lies inside")
    refused(capsys, [*base, "--out", str(foreign(tmp_path / "mine"))], "not a candidates output")
    assert (data / "records.parquet").read_bytes() == b"PAR1"


def test_query_map(tmp_path, capsys):
    data = fake_dataset(tmp_path / "data")
    base = ["query-map", "--model", "addressclip-tiny", "--dataset", str(data), "--query", "Kamppi"]
    refused(capsys, [*base, "--out", str(data)], "is the input")
    refused(capsys, [*base, "--out", str(foreign(tmp_path / "mine"))], "not a query-map output")


# --- stage 3: conversations ---------------------------------------------------------------------------------

def test_conversations_overwrite_never_deletes_the_dataset(tmp_path, capsys):
    data = fake_dataset(tmp_path / "data")
    before = snapshot(tmp_path)
    base = ["conversations", "--dataset", str(data), "--overwrite"]
    refused(capsys, [*base, "--out", str(data)], "is the input")
    refused(capsys, [*base, "--out", str(tmp_path)], "contains the input")  # the parent: siblings too
    refused(capsys, [*base, "--out", str(data / "images" / "conv")], "lies inside")
    refused(capsys, [*base, "--out", str(foreign(tmp_path / "mine"))], "not a conversations output")
    assert snapshot(tmp_path) == {**before, "mine/thesis.txt": b"keep me"}


def test_conversations_replace_their_own_kind_with_overwrite(toy_dataset, tmp_path, capsys):
    out = tmp_path / "conv"
    argv = ["conversations", "--dataset", str(toy_dataset), "--out", str(out), "--limit", "4"]
    assert cli.main(argv) == 0
    assert json.loads((out / MARKER_FILE).read_text())["kind"] == "conversations"
    refused(capsys, argv, "pass --overwrite")
    (out / MARKER_FILE).unlink()  # a folder from before markers (or anyone's with these names): never replaced
    (out / "my_results.csv").write_text("keep me")
    before = snapshot(out)
    refused(capsys, [*argv, "--overwrite"], "not replaced on that guess")
    assert snapshot(out) == before


# --- stage 4: LLaVA -----------------------------------------------------------------------------------------

def llava_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.png").write_bytes(b"png")
    (data / "train.json").write_text("[]")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return data, data / "images", model


def test_train_llava(tmp_path, capsys):
    data, images, model = llava_inputs(tmp_path)
    before = snapshot(tmp_path)
    base = ["train-llava", "--model-name-or-path", str(model), "--data-path", str(data / "train.json"),
            "--image-root", str(images)]
    refused(capsys, [*base, "--output-dir", str(images)], "is the input")
    refused(capsys, [*base, "--output-dir", str(model), "--resume", "latest"], "is the input")
    refused(capsys, [*base, "--output-dir", str(data)], "contains the input")
    refused(capsys, [*base, "--output-dir", str(foreign(tmp_path / "mine"))], "not a train-llava output")
    assert snapshot(tmp_path) == {**before, "mine/thesis.txt": b"keep me"}


def test_merge_refuses_the_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    ck = run / "checkpoint-000002"
    ck.mkdir(parents=True)
    (ck / "adapter_model.safetensors").write_bytes(b"weights")
    before = snapshot(run)
    refused(capsys, ["merge", "--checkpoint", str(ck), "--out", str(run)], "contains the input")
    refused(capsys, ["merge", "--checkpoint", str(ck), "--out", str(ck)], "is the input")
    refused(capsys, ["merge", "--checkpoint", str(ck), "--out", str(foreign(tmp_path / "mine")), "--overwrite"],
            "not a merge output")
    write_marker(tmp_path / "merged", "merge")
    refused(capsys, ["merge", "--checkpoint", str(ck), "--out", str(tmp_path / "merged")], "pass --overwrite")
    card_numbers = tmp_path / "merged" / "benchmark.json"  # --benchmark is an input too: replacing --out deletes it
    card_numbers.write_text("{}")
    refused(capsys, ["merge", "--checkpoint", str(ck), "--out", str(tmp_path / "merged"), "--overwrite",
                     "--benchmark", str(card_numbers)], "contains the input")
    assert snapshot(run) == before and card_numbers.read_text() == "{}"


def test_convert_llava(tmp_path, capsys):
    _, _, model = llava_inputs(tmp_path)
    tower = tmp_path / "tower"
    tower.mkdir()
    base = ["convert-llava", "--model-path", str(model), "--vision-tower", str(tower)]
    refused(capsys, [*base, "--out", str(model), "--overwrite"], "is the input")
    refused(capsys, [*base, "--out", str(foreign(tmp_path / "mine")), "--overwrite"], "not a convert-llava output")


def test_infer_out_file_not_inside_an_input(tmp_path, capsys):
    data, images, model = llava_inputs(tmp_path)
    before = snapshot(tmp_path)
    base = ["infer", "--model", str(model), "--eval", str(data / "train.json"), "--image-root", str(images)]
    refused(capsys, [*base, "--out", str(data / "train.json")], "is the input")
    refused(capsys, [*base, "--out", str(images / "answers.jsonl")], "lies inside")
    refused(capsys, [*base, "--out", str(model / "answers.jsonl")], "lies inside")
    assert snapshot(tmp_path) == before


# --- stage 5 and the whole pipeline ----------------------------------------------------------------------

def test_benchmark(tmp_path, capsys):
    data = fake_dataset(tmp_path / "data")
    (tmp_path / "eval.json").write_text("[]")
    base = ["benchmark", "--dataset", str(data), "--eval", str(tmp_path / "eval.json"),
            "--system", f"ours=llava:{tmp_path / 'model'}"]
    refused(capsys, [*base, "--out", str(data)], "is the input")
    refused(capsys, [*base, "--out", str(foreign(tmp_path / "mine"))], "not a benchmark output")
    assert not (data / MARKER_FILE).exists() and (data / "records.parquet").read_bytes() == b"PAR1"
    ckpt = tmp_path / "run" / "checkpoint-000002"  # every path a system reads is an input, not only its target
    ckpt.mkdir(parents=True)
    refused(capsys, [*base[:-1], f"ours=llava:{tmp_path / 'model'},adapter={ckpt}", "--out", str(ckpt / "bench")],
            "lies inside")
    assert not (ckpt / "bench").exists()


def test_demo(tmp_path, capsys):
    refused(capsys, ["demo", "--out", str(foreign(tmp_path / "mine"))], "not a demo output")
    net = tmp_path / "maps" / "city.osm"
    net.parent.mkdir()
    net.write_text("<osm/>")
    refused(capsys, ["demo", "--out", str(net.parent), "--network", str(net)], "contains the input")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "keep me" and net.read_text() == "<osm/>"


def test_demo_refuses_a_folder_that_merely_has_a_done_folder(tmp_path, capsys):
    proj = tmp_path / "proj"
    (proj / ".done").mkdir(parents=True)
    (proj / "llava").mkdir()
    (proj / "llava" / "notes.txt").write_text("precious")
    before = snapshot(proj)
    refused(capsys, ["demo", "--out", str(proj), "--until", "city", "--num-images", "60"], "is not a demo output")
    assert snapshot(proj) == before
