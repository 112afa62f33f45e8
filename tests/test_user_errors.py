"""Every command on its bad inputs: exit status 2, ONE line on stderr naming the input, no traceback.

Runs through `llava_address.apps.cli.main` (the `address-llava` dispatcher) unless a case says otherwise; a model path
that does not exist shows that the input was refused before any model load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from clip_stage.core import errors
from llava_address.apps import cli


def _broken_png(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00junk")
    return path


def _record(rid, image="a.png", turns=None):
    turns = turns or [("human", "<image>\nWhere is this?"), ("gpt", "Main Street.")]
    return {"id": rid, "image": image, "conversations": [{"from": f, "value": v} for f, v in turns]}


@pytest.fixture()
def bad(tmp_path):
    """A folder of broken inputs: a broken PNG, a bad OSM file, conversation files with one defect each."""
    from PIL import Image

    tmp_path = tmp_path / "in"  # outputs go beside it: an output folder inside an input is refused
    tmp_path.mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    _broken_png(tmp_path / "broken.png")
    (tmp_path / "bad.osm").write_text("<osm>not closed")
    (tmp_path / "gpt_first.json").write_text(json.dumps(
        [_record("ok"), _record("g", turns=[("gpt", "Main Street."), ("human", "<image>\nWhere?")])]))
    (tmp_path / "empty_answer.json").write_text(json.dumps([_record("e", turns=[("human", "<image>\nWhere?"),
                                                                                ("gpt", " ")])]))
    (tmp_path / "unsafe.json").write_text(json.dumps([_record("u", image="../outside.png")]))
    (tmp_path / "not_json.json").write_text("[{\"id\": 1,")
    ds = tmp_path / "dataset"
    ds.mkdir()
    (ds / "records.parquet").write_bytes(b"PAR1 truncated")
    return tmp_path


def _one_line_error(capsys, rc, *words):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert "error:" in lines[0]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


CASES = {
    # name: (argv built from the folder of bad inputs, words the line must hold)
    "chat corrupt image": (lambda d: ["chat", "--model", str(d / "no-model"), "--image", str(d / "broken.png"),
                                      "--question", "where?"], ["broken.png", "not a readable image"]),
    "demo-city bad network": (lambda d: ["demo-city", "--out", str(d.parent / "city"), "--num-images", "4",
                                         "--network", str(d / "bad.osm")], ["bad.osm"]),
    "train-llava record starting with gpt": (
        lambda d: ["train-llava", "--model-name-or-path", str(d / "no-model"), "--data-path",
                   str(d / "gpt_first.json"), "--output-dir", str(d.parent / "run")],
        ["gpt_first.json", "record 1", "starts with an assistant message"]),
    "train-llava empty answer": (
        lambda d: ["train-llava", "--model-name-or-path", str(d / "no-model"), "--data-path",
                   str(d / "empty_answer.json"), "--output-dir", str(d.parent / "run")],
        ["empty_answer.json", "conversations[1].value", "empty"]),
    "train-llava unsafe image path": (
        lambda d: ["train-llava", "--model-name-or-path", str(d / "no-model"), "--data-path",
                   str(d / "unsafe.json"), "--output-dir", str(d.parent / "run")], ["unsafe.json", "id='u'", "image"]),
    "train-llava file not JSON": (
        lambda d: ["train-llava", "--model-name-or-path", str(d / "no-model"), "--data-path",
                   str(d / "not_json.json"), "--output-dir", str(d.parent / "run")], ["not_json.json"]),
    "infer eval record starting with gpt": (
        lambda d: ["infer", "--model", str(d / "no-model"), "--eval", str(d / "gpt_first.json"), "--image-root",
                   str(d), "--out", str(d.parent / "answers.jsonl")], ["gpt_first.json", "starts with an assistant message"]),
    "infer --max-new-tokens 0": (
        lambda d: ["infer", "--model", "m", "--eval", str(d / "gpt_first.json"), "--image-root", str(d),
                   "--out", str(d.parent / "answers.jsonl"), "--max-new-tokens", "0"], ["--max-new-tokens 0"]),
    "infer --limit 0": (
        lambda d: ["infer", "--model", "m", "--eval", str(d / "gpt_first.json"), "--image-root", str(d),
                   "--out", str(d.parent / "answers.jsonl"), "--limit", "0"], ["--limit 0"]),
    "infer --device bogus": (
        lambda d: ["infer", "--model", "m", "--eval", str(d / "gpt_first.json"), "--image-root", str(d),
                   "--out", str(d.parent / "answers.jsonl"), "--device", "bogus"], ["--device bogus"]),
    "infer missing image root": (
        lambda d: ["infer", "--model", "m", "--eval", str(d / "gpt_first.json"), "--image-root", str(d / "nope"),
                   "--out", str(d.parent / "answers.jsonl")], ["--image-root", "not a folder"]),
    "chat empty question": (lambda d: ["chat", "--model", str(d / "no-model"), "--image", str(d / "broken.png"),
                                       "--question", " "], ["--question is empty"]),
    "chat --top-k 0": (lambda d: ["chat", "--model", str(d / "no-model"), "--image", str(d / "broken.png"),
                                  "--top-k", "0"], ["--top-k 0"]),
    "benchmark --limit -1": (
        lambda d: ["benchmark", "--dataset", str(d / "dataset"), "--eval", str(d / "gpt_first.json"), "--out",
                   str(d.parent / "bench"), "--system", "x=jsonl:a.jsonl", "--limit", "-1"], ["--limit -1"]),
    "infer SystemExit message": (
        lambda d: ["infer", "--model", "m", "--eval", str(d / "gpt_first.json"), "--image-root", str(d),
                   "--out", str(d.parent / "answers.jsonl"), "--batch-size", "0"], ["--batch-size"]),
    "train-clip corrupt dataset": (
        lambda d: ["train-clip", "--dataset", str(d / "dataset"), "--model", "addressclip-tiny", "--pretrained",
                   "none", "--output-dir", str(d.parent / "clip-run")], ["records.parquet"]),
    "dataset-summary corrupt dataset": (lambda d: ["dataset-summary", str(d / "dataset")], ["records.parquet"]),
    "score corrupt dataset": (
        lambda d: ["score", "--dataset", str(d / "dataset"), "--answers", str(d / "gpt_first.json")], ["records.parquet"]),
    "score missing answers": (
        lambda d: ["score", "--dataset", str(d / "dataset"), "--answers", str(d / "nope.jsonl")], ["nope.jsonl"]),
    "conv-stats missing file": (lambda d: ["conv-stats", str(d / "nope.json")], ["nope.json"]),
    "conv-stats a folder": (lambda d: ["conv-stats", str(d)], ["a folder, not a file"]),
    "conv-stats --png at a folder": (lambda d: ["conv-stats", str(d / "gpt_first.json"), "--png", str(d)],
                                     ["--png", "is a folder"]),
    "validate missing file": (lambda d: ["validate", str(d / "nope.json"), "--no-image-check"], ["nope.json"]),
    "chat image is a folder": (lambda d: ["chat", "--model", str(d / "no-model"), "--image", str(d)],
                               ["is a folder"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(bad, capsys, case):
    argv, words = CASES[case]
    rc = cli.main(argv(bad))
    _one_line_error(capsys, rc, *words)


def test_the_command_main_is_guarded_too(bad, capsys):
    """Tests and scripts call `main(argv)` directly: the same guard applies there."""
    from llava_address.apps import chat

    rc = chat.main(["--model", str(bad / "no-model"), "--image", str(bad / "broken.png")])
    _one_line_error(capsys, rc, "chat: error:", "broken.png")


def test_debug_flag_and_env_show_the_traceback(bad, monkeypatch):
    from llava_address.eval.infer import InferenceInputError

    argv = ["chat", "--model", str(bad / "no-model"), "--image", str(bad / "broken.png")]
    monkeypatch.delenv(errors.DEBUG_ENV, raising=False)
    with pytest.raises(InferenceInputError, match="broken.png"):
        cli.main(["--debug", *argv])
    assert errors.DEBUG_ENV not in os.environ  # set for that command only
    with pytest.raises(InferenceInputError):
        cli.main([*argv, "--debug"])  # among the command's options
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    with pytest.raises(InferenceInputError):
        cli.main(argv)


def test_bugs_keep_their_traceback(capsys):
    """Only user errors are shortened: an unexpected exception (a bug) still raises."""

    def buggy(argv):
        raise ValueError("a library's ValueError is not ours")  # not a project class: a bug until shown otherwise

    with pytest.raises(ValueError):
        errors.run_guarded("x", buggy, [])

    def broken_pipe(argv):
        raise BrokenPipeError

    assert errors.run_guarded("x", broken_pipe, []) == 0 and capsys.readouterr().err == ""


def test_truncated_clip_checkpoint_names_the_file(tmp_path, capsys):
    from clip_stage.model import create_clip, save_checkpoint

    ck = tmp_path / "ck"
    save_checkpoint(ck, create_clip("addressclip-tiny", None).model, "addressclip-tiny", None)
    weights = ck / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (ck / "manifest.json").unlink(missing_ok=True)  # an old checkpoint without a manifest: read, not verified
    rc = cli.main(["export-clip", "--checkpoint", str(ck), "--out", str(tmp_path / "hf")])
    _one_line_error(capsys, rc, "model.safetensors")


def test_dataset_summary_into_a_closed_pipe_is_quiet(toy_dataset, tmp_path):
    """`address-llava dataset-summary DS | head -1`: no BrokenPipeError, nothing on stderr."""
    exe = shutil.which("address-llava", path=str(__import__("pathlib").Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "llava_address.apps.cli"]
    # A reader that closes at once: the command's writes (or its exit flush) meet a closed pipe.
    proc = subprocess.Popen([*cmd, "dataset-summary", str(toy_dataset)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_build_dataset_with_every_row_rejected_exits_non_zero(tmp_path, capsys):
    from PIL import Image

    from tests.test_data_network import write_osm

    images = tmp_path / "img"
    images.mkdir()
    Image.new("RGB", (8, 8), "red").save(images / "a.png")
    (tmp_path / "gps.csv").write_text("image,lat,lon\na.png,not-a-number,24.9\nmissing.png,60.17,24.94\n")
    out = tmp_path / "dataset"
    rc = cli.main(["build-dataset", "--images", str(images), "--gps", str(tmp_path / "gps.csv"), "--network",
                   str(write_osm(tmp_path / "toy.osm")), "--out", str(out), "--quiet"])
    line = _one_line_error(capsys, rc, "no image was kept of 2 rows", "rejects.jsonl")
    assert (out / "rejects.jsonl").is_file(), line  # the reasons stay readable


def test_progress_bars_off_a_terminal_write_plain_lines(monkeypatch):
    import io
    import time

    from clip_stage.core.progress import progress

    log = io.StringIO()  # not a terminal
    monkeypatch.setenv("ADDRESS_LLAVA_PROGRESS_INTERVAL", "0.02")
    for _ in progress(range(4), desc="work", file=log):
        time.sleep(0.03)
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "4/4" in lines[-1]
    assert 2 <= len(lines) <= 6 and all(line.startswith("work:") for line in lines), text
    monkeypatch.setenv("ADDRESS_LLAVA_PROGRESS_INTERVAL", "3600")
    log = io.StringIO()
    for _ in progress(range(1000), desc="quiet", file=log):
        pass
    assert len(log.getvalue().splitlines()) <= 2  # start and end, not a frame per item


def test_errors_of_a_command_run_with_python_m_are_user_errors_too(monkeypatch):
    """`python -m clip_stage.evaluate` defines EvalError in `__main__`: still a project error (one line)."""
    import types

    run_as_script = types.ModuleType("__main__")
    run_as_script.__spec__ = types.SimpleNamespace(name="clip_stage.evaluate")
    monkeypatch.setitem(sys.modules, "__main__", run_as_script)
    error = type("EvalError", (ValueError,), {"__module__": "__main__"})
    assert errors.is_user_error(error("--batch-size must be >= 1"))
    run_as_script.__spec__ = types.SimpleNamespace(name="someone_elses.tool")
    assert not errors.is_user_error(error("a bug"))
