"""infer's checks before the model loads: the --out file it would resume, and the images it would answer."""

from __future__ import annotations

import json

from PIL import Image

from llava_address.eval import infer


def _split(tmp_path, ids):
    (tmp_path / "images").mkdir(exist_ok=True)
    records = [{"id": i, "image": f"{i}.png",
                "conversations": [{"from": "human", "value": "<image>\nWhere was this photo taken?"},
                                  {"from": "gpt", "value": "On Postikatu."}]} for i in ids]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(records))
    return path


def _argv(tmp_path, eval_path, out):
    return ["--model", str(tmp_path / "no-model"), "--eval", str(eval_path), "--image-root", str(tmp_path / "images"),
            "--out", str(out)]


def test_a_foreign_out_file_is_refused_before_the_model_loads(tmp_path, capsys):
    eval_path = _split(tmp_path, ["a"])
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    notes = tmp_path / "notes.json"
    notes.write_text('{"a": 1}\n')
    assert infer.main(_argv(tmp_path, eval_path, notes)) == 2
    err = capsys.readouterr().err
    assert "not an answers line" in err and "no-model" not in err  # the model was never reached
    assert notes.read_text() == '{"a": 1}\n'


def test_unreadable_images_are_counted_up_front_among_the_records_still_to_answer(tmp_path, capsys):
    eval_path = _split(tmp_path, ["good", "garbage", "missing", "done"])
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "good.png")
    (tmp_path / "images" / "garbage.png").write_bytes(b"not an image at all")
    out = tmp_path / "answers.jsonl"
    out.write_text(json.dumps({"id": "done", "answer": "On Postikatu."}) + "\n")  # answered before; its image is gone
    assert infer.main(_argv(tmp_path, eval_path, out)) == 2  # then it stops: that file has no record of its model
    err = capsys.readouterr().err
    assert "2 of the 3 records to answer have unusable images" in err and "first: id garbage" in err
    bad = dict(infer.unusable_images(infer.eval_items(eval_path), tmp_path / "images"))
    assert set(bad) == {"garbage", "missing", "done"} and "not a readable image" in bad["garbage"]

