"""`validate`: every rule has a failing example; LLaVA's own files validate; streaming in bounded memory."""

import copy
import json
import os
import tracemalloc

import pytest

from conversations import validate
from conversations.records import iter_records, write_json_array

# LLaVA's own sample formats: llava_v1_5_mix665k (multi-turn, "<image>\n" prefix, text-only records
# without "image") and the LCS-558K pretraining file ("...\n<image>" suffix).
MIX665K = [
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
    {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]},
]
TEXT_ONLY = {"id": "i6IyJda_0", "model": "", "conversations": [
    {"from": "human", "value": "How to tell if a customer segment is well segmented? In 3 bullet points."},
    {"from": "gpt", "value": "1. Homogeneity 2. Distinctiveness 3. Stability"}]}


@pytest.fixture()
def root(tmp_path):
    """An image root holding the two sample images, and a file outside it."""
    r = tmp_path / "images"
    for rec in MIX665K:
        (r / rec["image"]).parent.mkdir(parents=True, exist_ok=True)
        (r / rec["image"]).write_bytes(b"\x89PNG")
    (tmp_path / "outside.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "outside.jpg", r / "link_out.jpg")
    (r / "a_dir").mkdir()
    return r


def _run(path, root, *extra, capsys=None):
    rc = validate.main([str(path), "--image-root", str(root), *extra])
    return rc, capsys.readouterr().out if capsys else ""


@pytest.mark.parametrize("indent", [None, 2])
def test_llava_own_format_validates(tmp_path, root, capsys, indent):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(MIX665K, indent=indent))
    rc, out = _run(path, root, capsys=capsys)
    assert rc == 0, out
    assert "OK: 2 records read, 0 problems" in out


def test_text_only_records(tmp_path, root, capsys):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(MIX665K + [TEXT_ONLY]))
    rc, out = _run(path, root, capsys=capsys)
    assert rc == 1 and "record 2 (id='i6IyJda_0'): image: missing" in out
    rc, out = _run(path, root, "--allow-text-only", capsys=capsys)
    assert rc == 0, out


def test_our_output_validates(toy_dataset, toy_conversations, capsys):
    files = [toy_conversations / n for n in ("train.json", "eval.json", "train.jsonl")]
    assert validate.main([*map(str, files), "--image-root", str(toy_dataset / "images")]) == 0
    out = capsys.readouterr().out
    assert out.count(": OK: ") == 3


def _conv(rec):
    return rec["conversations"]


# (mutation of a valid record, field in the message, words in the message)
RULES = {
    "not_object": (None, "record", "must be a JSON object"),
    "id_missing": (lambda r: r.pop("id"), "id", "missing"),
    "id_empty": (lambda r: r.update(id="  "), "id", "empty"),
    "id_type": (lambda r: r.update(id=[1]), "id", "string or integer"),
    "image_missing": (lambda r: r.pop("image"), "image", "missing"),
    "image_empty": (lambda r: r.update(image=""), "image", "empty"),
    "image_type": (lambda r: r.update(image=["a.jpg"]), "image", "must be a string"),
    "image_absolute": (lambda r: r.update(image="/etc/passwd"), "image", "absolute"),
    "image_dotdot": (lambda r: r.update(image="coco/../../outside.jpg"), "image", "escapes the image root"),
    "image_symlink_out": (lambda r: r.update(image="link_out.jpg"), "image", "escapes the image root"),
    "image_not_found": (lambda r: r.update(image="coco/nope.jpg"), "image", "does not exist"),
    "image_is_dir": (lambda r: r.update(image="a_dir"), "image", "does not exist"),
    "conversations_missing": (lambda r: r.pop("conversations"), "conversations", "missing"),
    "conversations_type": (lambda r: r.update(conversations="hi"), "conversations", "must be a list"),
    "conversations_empty": (lambda r: r.update(conversations=[]), "conversations", "empty"),
    "turn_type": (lambda r: _conv(r).__setitem__(1, "text"), "conversations[1]", "must be an object"),
    "from_missing": (lambda r: _conv(r)[1].pop("from"), "conversations[1].from", "missing"),
    "from_unknown": (lambda r: _conv(r)[1].update({"from": "assistant"}), "conversations[1].from", "'human' or 'gpt'"),
    "gpt_first": (lambda r: _conv(r).reverse(), "conversations[0].from", "alternate starting with human"),
    "human_twice": (lambda r: _conv(r)[1].update({"from": "human"}), "conversations[1].from", "alternate"),
    "value_missing": (lambda r: _conv(r)[1].pop("value"), "conversations[1].value", "missing"),
    "value_type": (lambda r: _conv(r)[1].update(value=None), "conversations[1].value", "must be a string"),
    "value_empty": (lambda r: _conv(r)[3].update(value=" \n"), "conversations[3].value", "empty"),
    "value_only_image": (lambda r: _conv(r)[0].update(value="<image>\n"), "conversations[0].value", "empty"),
    "image_token_missing": (lambda r: _conv(r)[0].update(value="What is this?"), "conversations[0].value", "exactly once (found 0)"),
    "image_token_twice": (lambda r: _conv(r)[0].update(value="<image>\n<image>\nWhat?"), "conversations[0].value", "exactly once (found 2)"),
    "image_token_later": (lambda r: _conv(r)[2].update(value="<image>\nAnd?"), "conversations[2].value", "only in the first human turn"),
    "image_token_in_answer": (lambda r: _conv(r)[1].update(value="See <image>"), "conversations[1].value", "only in the first human turn"),
    "ends_with_human": (lambda r: _conv(r).pop(), "conversations", "not a gpt answer"),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_has_a_failing_example(tmp_path, root, capsys, rule):
    mutate, fld, words = RULES[rule]
    bad = copy.deepcopy(MIX665K[0])
    bad["id"] = "bad"
    if mutate is None:
        bad = ["a", "list"]
    else:
        mutate(bad)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([MIX665K[0], bad, MIX665K[1]]))
    rc, out = _run(path, root, capsys=capsys)
    assert rc == 1, out
    problems = [line for line in out.splitlines() if line.startswith(f"{path}: record 1 (")]
    assert problems, out
    assert any(f": {fld}: " in p and words in p for p in problems), out
    if rule not in ("id_missing", "id_type", "id_empty", "not_object"):
        assert all("(id='bad')" in p for p in problems)
    assert "record 0 " not in out and "record 2 " not in out  # the good neighbours are clean
    assert "FAILED: 3 records read" in out.splitlines()[-1]


def test_image_token_in_text_only_record(tmp_path, root, capsys):
    rec = copy.deepcopy(TEXT_ONLY)
    rec["conversations"][0]["value"] = "<image>\nHi"
    path = tmp_path / "t.json"
    path.write_text(json.dumps([rec]))
    rc, out = _run(path, root, "--allow-text-only", capsys=capsys)
    assert rc == 1 and "without an image" in out


@pytest.mark.parametrize("text, words", [
    ('[{"id": "a", "image": "x"', "unexpected end of file"),
    ('[{"id": "a"} {"id": "b"}]', "expected ',' or ']' after record 0"),
    ('[{"id": "a"}, {"id": b}]', "invalid JSON"),
    ('[{"id": "a"}] extra', "extra data after the closing"),
    ('', "top level must be a JSON array"),
    ('"just a string"', "top level must be a JSON array"),
    ('{\n  "id": "a"\n}\n', "one complete record per line"),
])
def test_malformed_json(tmp_path, root, capsys, text, words):
    path = tmp_path / "m.json"
    path.write_text(text)
    rc, out = _run(path, root, capsys=capsys)
    assert rc == 1 and words in out, out


def test_jsonl_reports_bad_lines_and_continues(tmp_path, root, capsys):
    good, other = json.dumps(MIX665K[0]), json.dumps(dict(MIX665K[0], id="other"))
    path = tmp_path / "m.jsonl"
    path.write_text(f"{good}\n{{broken\n\n{other}\n")
    rc, out = _run(path, root, capsys=capsys)
    assert rc == 1 and "record 1 (id=?): json: line 2: invalid JSON" in out
    assert "3 records read, 1 problems in 1 records" in out


def test_not_utf8_and_missing_file(tmp_path, root, capsys):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"id": "é"}]'.encode("latin-1"))
    rc, out = _run(path, root, capsys=capsys)
    assert rc == 1 and "not UTF-8" in out
    assert validate.main([str(tmp_path / "none.json"), "--image-root", str(root)]) == 2  # a usage error
    assert "none.json: no such file" in capsys.readouterr().err


def test_usage_errors(tmp_path, capsys):
    assert validate.main([str(tmp_path / "x.json")]) == 2
    assert "--image-root is required" in capsys.readouterr().err
    assert validate.main([str(tmp_path / "x.json"), "--image-root", str(tmp_path / "nope")]) == 2


def test_no_image_check_and_max_problems(tmp_path, capsys):
    recs = [dict(copy.deepcopy(MIX665K[0]), id=str(i), image=f"missing/{i}.jpg") for i in range(5)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recs))
    assert validate.main([str(path), "--no-image-check"]) == 0
    assert "(images not checked)" in capsys.readouterr().out
    assert validate.main([str(path), "--image-root", str(tmp_path), "--max-problems", "2"]) == 1
    out = capsys.readouterr().out
    assert out.count("does not exist") == 2 and "3 more problems not shown" in out
    assert "5 problems in 5 records" in out


def test_streaming_reader_matches_json_load_across_chunk_boundaries(tmp_path):
    recs = [dict(copy.deepcopy(MIX665K[i % 2]), id=f"{i}", extra=[1.5, "ü" * (i % 7), None, True]) for i in range(60)]
    recs[17]["conversations"][1]["value"] = "long " * 5000  # one record spanning many chunks
    for indent in (None, 1):
        path = tmp_path / "r.json"
        path.write_text(json.dumps(recs, indent=indent, ensure_ascii=False))
        for chunk in (1, 7, 4096):
            items = list(iter_records(path, chunk_size=chunk))
            assert all(i.error is None for i in items)
            assert [i.value for i in items] == recs
    path.write_text("[1, 22, 333]")  # bare numbers must not be cut at a chunk boundary
    assert [i.value for i in iter_records(path, chunk_size=1)] == [1, 22, 333]


def test_validation_streams_in_bounded_memory(tmp_path, root):
    """20,000 records (about 4.4 MB) validate with a peak far below the file size."""
    path = tmp_path / "big.json"
    rec = MIX665K[0]
    write_json_array(path, (dict(rec, id=f"{i:09d}") for i in range(20_000)))
    size = path.stat().st_size
    assert size > 4_000_000
    tracemalloc.start()
    try:
        report = validate.validate_file(path, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok and report.records == 20_000
    assert peak < size / 10, (peak, size)


def test_duplicate_ids_are_reported_with_the_first_record(tmp_path, root, capsys):
    recs = [dict(copy.deepcopy(MIX665K[i % 2]), id=rid) for i, rid in enumerate(["a", "b", "a", 7, "7", 7, "a"])]
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(recs))
    rc, out = _run(path, root, capsys=capsys)
    assert rc == 1
    dups = [line for line in out.splitlines() if ": id: duplicate" in line]
    assert dups == [f"{path}: record 2 (id='a'): id: duplicate: record 0 has the same id",
                    f"{path}: record 5 (id=7): id: duplicate: record 3 has the same id",
                    f"{path}: record 6 (id='a'): id: duplicate: record 0 has the same id"]  # 7 and "7" differ
    assert "3 problems in 3 records" in out
    rc, out = _run(path, root, "--allow-duplicate-ids", capsys=capsys)
    assert rc == 0, out
