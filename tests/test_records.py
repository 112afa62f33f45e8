"""The record contract (`conversations.records`): reading and writing JSON arrays and JSON lines, one-line
errors naming the file and the record, the Reference the builder writes, and one definition of `<image>`."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from clip_stage.core.fs import iter_jsonl, read_jsonl
from conversations import records
from conversations.records import (IMAGE_TOKEN, MULTIPLE_CHOICE, QUESTION_TYPE_NAMES, REFERENCE_KEYS, YES_NO, Reference,
                                   RecordError, eval_records, first_question, iter_records, load_eval_records,
                                   load_records, write_json_array, write_jsonl)
from conversations.templates import QUESTION_TYPES

ROOT = Path(__file__).resolve().parents[1]
RECS = [{"id": f"r{i}", "image": f"{i}.png", "conversations": [
    {"from": "human", "value": f"{IMAGE_TOKEN}\nWhere is this? ü {i}"}, {"from": "gpt", "value": "Kamppi."}]}
    for i in range(5)]


@pytest.mark.parametrize("writer, name", [(write_json_array, "r.json"), (write_jsonl, "r.jsonl"),
                                          (write_jsonl, "r.json")])
def test_round_trip_json_array_and_jsonl(tmp_path, writer, name):
    path = tmp_path / name
    assert writer(path, iter(RECS)) == len(RECS)
    assert load_records(path) == RECS  # the format is read from the content (JSONL under a .json name too)
    assert [it.value for it in iter_records(path, chunk_size=7)] == RECS  # records split across chunks


def test_empty_array_and_bom(tmp_path):
    (tmp_path / "e.json").write_text("[]\n", encoding="utf-8")
    assert load_records(tmp_path / "e.json") == []
    (tmp_path / "b.jsonl").write_text("\ufeff" + json.dumps(RECS[0]) + "\n\n", encoding="utf-8")
    assert load_records(tmp_path / "b.jsonl") == RECS[:1]


@pytest.mark.parametrize("text, name, message", [
    ('{"id": "a"}\n{oops\n', "x.jsonl", r"x.jsonl: line 2: invalid JSON"),
    ('[{"id": "a"}, {"id": "b"', "x.json", r"x.json: unexpected end of file inside record 1"),
    ('[{"id": "a"} {"id": "b"}]', "x.json", r"x.json: expected ',' or ']' after record 0"),
    ('[{"id": "a"}, 3]', "x.json", r"x.json: record 1: must be a JSON object, got int"),
    ("", "x.json", r"x.json: top level must be a JSON array"),
])
def test_malformed_files_are_one_line_errors_naming_file_and_record(tmp_path, text, name, message):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(RecordError, match=message) as e:
        load_records(tmp_path / name)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_records(tmp_path / "nope.json")


def test_the_one_jsonl_reader(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n[1]\n{bad\n', encoding="utf-8")
    lines = list(iter_jsonl(path))
    assert [(x.lineno, x.value) for x in lines[:2]] == [(1, {"a": 1}), (3, [1])]
    assert lines[2].lineno == 4 and lines[2].error.startswith("invalid JSON")
    with pytest.raises(KeyError, match=r"a.jsonl: line 3: expected a JSON object, got list"):
        read_jsonl(path, KeyError)


def test_reference_from_the_builders_output(toy_conversations):
    evaluation = load_eval_records(toy_conversations / "eval.json")
    raw = {r["id"]: r for r in load_records(toy_conversations / "eval.json")}
    assert evaluation and {r.reference.question_type for r in evaluation} >= {YES_NO, MULTIPLE_CHOICE}
    for r in evaluation:
        assert r.reference.to_dict() == raw[r.id]["reference"]  # every field, in the file's key order
        assert list(raw[r.id]["reference"]) == list(REFERENCE_KEYS)
        assert r.question == first_question(raw[r.id]) and IMAGE_TOKEN not in r.question and r.question
        assert r.image == raw[r.id]["image"] and r.reference.utm is not None
        ref = r.reference
        if ref.question_type == YES_NO:
            assert ref.yes is (ref.expected_answer == "yes") and ref.letter is None
        elif ref.question_type == MULTIPLE_CHOICE:
            assert ref.choices[ord(ref.letter) - ord("A")] == ref.correct_choice and ref.yes is None


def test_question_type_names_are_the_templates():
    assert set(QUESTION_TYPE_NAMES) == set(QUESTION_TYPES)


@pytest.mark.parametrize("ref, message", [
    ({"question_type": "full"}, r"unknown question type 'full'"),
    ({"question_type": "full_address", "expected": True}, r"unknown key\(s\) \['expected'\]"),
    ({"street": "Esplanadi"}, "no question_type"),
    ({"question_type": "yes_no", "expected_answer": "true"}, "expected_answer 'yes' or 'no'"),
    ({"question_type": "multiple_choice", "expected_answer": "(b)"}, "a letter A-Z"),
    ({"question_type": "multiple_choice", "expected_answer": "C", "choices": ["x", "y"]}, "names no option of 2"),
    ({"question_type": "street", "cross_streets": "Kaivokatu"}, "cross_streets must be a list of texts"),
    ({"question_type": "street", "utm_x": "12"}, "utm_x must be a number"),
    ([1], "reference must be an object"),
])
def test_a_reference_off_the_contract_is_a_one_line_error(ref, message):
    with pytest.raises(RecordError, match=message) as e:
        Reference.from_dict(ref, "eval.json: record 3 (id 'x'): ")
    assert str(e.value).startswith("eval.json: record 3 (id 'x'): ") and "\n" not in str(e.value)


def test_eval_records_need_unique_ids_and_a_reference():
    ref = {"question_type": "street", "street": "Esplanadi"}
    rec = {"id": "a", "image": "a.png", "conversations": RECS[0]["conversations"], "reference": ref}
    assert eval_records([rec])[0].reference == Reference(question_type="street", street="Esplanadi")
    with pytest.raises(RecordError, match=r"f.json: record 1 \(id 'a'\): duplicate id"):
        eval_records([rec, rec], "f.json")
    with pytest.raises(RecordError, match=r"record 0 \(id 'b'\): has no 'reference'"):
        eval_records([{"id": "b"}])


def _string_constants(tree: ast.AST):
    """String constants of a module that are not docstrings (prose may name `<image>`; code may not)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstrings.update(id(n.value) for n in node.body if isinstance(n, ast.Expr)
                              and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_image_token_is_defined_once():
    """`<image>` is spelled only in conversations/records.py; every other module imports IMAGE_TOKEN."""
    offenders = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv", "runs", "build") or rel == Path(records.__file__).relative_to(ROOT):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        offenders += [f"{rel}:{n.lineno}" for n in _string_constants(tree) if IMAGE_TOKEN in n.value]
    assert not offenders, f"literal {IMAGE_TOKEN} outside conversations/records.py: {offenders}"
