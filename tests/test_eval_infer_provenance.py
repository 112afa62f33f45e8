"""infer resumes only answers provably written by the same model and settings: `ANSWERS.system.json` beside
`--out` (the record benchmark keeps for `OUT/answers/NAME.jsonl`, checked by the same function), checked before
the model loads.

The model loader is replaced by a stand-in whose answers name the model folder, so each test runs in about a
second; the real tiny model's resumed run is tests/test_eval_benchmark.py's infer test."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest

from llava_address.eval import benchmark, infer
from tests.llava_helpers import fake_adapter_checkpoint, fake_model_folder


@pytest.fixture
def loads(monkeypatch):
    """Every model 'loaded' (model, adapter), answered by a stand-in that names the model: no weights are read."""
    loaded = []

    def load_generator(model, adapter=None, device="cpu", dtype="auto"):
        loaded.append((model, adapter))
        return SimpleNamespace(name=os.path.basename(str(model)), pad_to_square=True)

    monkeypatch.setattr(infer, "load_generator", load_generator)
    monkeypatch.setattr(infer, "llava_answer_batch",
                        lambda gen, max_new_tokens: lambda questions, images: [f"{gen.name} says Esplanadi"]
                        * len(questions))
    return loaded


def _argv(toy_dataset, toy_conversations, model, out, *more):
    return ["--model", str(model), "--eval", str(toy_conversations / "eval.json"), "--image-root",
            str(toy_dataset / "images"), "--out", str(out), "--device", "cpu", *more]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_of_another_model_are_refused_before_it_loads(loads, toy_dataset, toy_conversations, tmp_path,
                                                              capsys):
    a = fake_model_folder(tmp_path / "model-a", b"a" * 64, 1_700_000_000)
    b = fake_model_folder(tmp_path / "model-b", b"b" * 64, 1_700_000_000)
    out = tmp_path / "answers.jsonl"
    assert infer.main(_argv(toy_dataset, toy_conversations, a, out, "--limit", "4")) == 0
    written, recorded = out.read_bytes(), (tmp_path / "answers.system.json").read_bytes()
    capsys.readouterr()

    assert infer.main(_argv(toy_dataset, toy_conversations, b, out, "--limit", "8")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("infer: error:")
    assert f"{out} was written by infer:{a.resolve()}" in err and f"given now: infer:{b.resolve()}" in err
    assert "use another --out to answer afresh (nothing was deleted)" in err
    assert loads == [(str(a), None)]  # model B was never loaded
    assert out.read_bytes() == written and (tmp_path / "answers.system.json").read_bytes() == recorded


def test_the_same_settings_resume_after_a_kill(loads, toy_dataset, toy_conversations, tmp_path):
    model = fake_model_folder(tmp_path / "m", b"w" * 64, 1_700_000_000)
    out = tmp_path / "answers.jsonl"
    assert infer.main(_argv(toy_dataset, toy_conversations, model, out, "--limit", "4")) == 0
    record = json.loads((tmp_path / "answers.system.json").read_text())
    assert record["kind"] == "infer" and record["target"] == str(model.resolve())
    assert record["options"] == {"engine": "hf", "max_new_tokens": 64, "dtype": "auto", "pad_to_square": True}
    assert set(record["contents"]) == {"target"} and record["contents"]["target"]["files"] == 2
    first = _rows(out)
    with out.open("a") as f:
        f.write('{"id": "torn-wri')  # a run killed in the middle of a write
    # batch size and device are free to change: they do not change an answer
    assert infer.main(_argv(toy_dataset, toy_conversations, model, out, "--limit", "8", "--batch-size", "3")) == 0
    rows = _rows(out)
    assert rows[:4] == first and len(rows) == 8 and len({r["id"] for r in rows}) == 8
    assert json.loads((tmp_path / "answers.system.json").read_text()) == record
    assert len(loads) == 2


def test_a_model_replaced_in_the_same_folder_is_refused(loads, toy_dataset, toy_conversations, tmp_path, capsys):
    model = fake_model_folder(tmp_path / "merged", b"merged" * 10, 1_700_000_000)
    out = tmp_path / "answers.jsonl"
    assert infer.main(_argv(toy_dataset, toy_conversations, model, out, "--limit", "4")) == 0
    capsys.readouterr()
    shutil.rmtree(model)  # like `merge --overwrite` of another checkpoint into the same folder
    fake_model_folder(model, b"base" * 10, 1_700_000_500)
    assert infer.main(_argv(toy_dataset, toy_conversations, model, out, "--limit", "8")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "files of 2023-11-14 22:13:20 UTC" in err  # what wrote them ...
    assert "given now:" in err and "files of 2023-11-14 22:21:40 UTC" in err  # ... and what is there now
    assert len(loads) == 1 and len(out.read_text().splitlines()) == 4


@pytest.mark.parametrize("change, words", [
    (["--max-new-tokens", "8"], "max_new_tokens=8"),
    (["--no-pad-to-square"], "pad_to_square=false"),
    (["--dtype", "float32"], "dtype=float32"),
])
def test_options_that_change_an_answer_are_part_of_the_record(loads, toy_dataset, toy_conversations, tmp_path,
                                                              capsys, change, words):
    model = fake_model_folder(tmp_path / "m", b"w" * 64, 1_700_000_000)
    out = tmp_path / "answers.jsonl"
    assert infer.main(_argv(toy_dataset, toy_conversations, model, out, "--limit", "2")) == 0
    capsys.readouterr()
    assert infer.main(_argv(toy_dataset, toy_conversations, model, out, "--limit", "4", *change)) == 2
    err = capsys.readouterr().err
    assert "was written by" in err and words in err.split("given now:")[1]
    assert len(loads) == 1


def test_answers_without_a_record_are_refused_and_left_as_they_are(loads, toy_dataset, toy_conversations, tmp_path,
                                                                   capsys):
    model = fake_model_folder(tmp_path / "m", b"w" * 64, 1_700_000_000)
    out = tmp_path / "answers.jsonl"  # written before records were kept, or copied in; an error row and a torn line
    text = ('{"id": "000001", "answer": "Esplanadi"}\n{"id": "000002", "error": "image missing"}\n'
            '{"id": "000003", "ans')
    out.write_text(text)
    assert infer.main(_argv(toy_dataset, toy_conversations, model, out, "--retry-errors")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{out} has no record of the model that wrote it (answers.system.json missing" in err
    assert "use another --out" in err
    assert not loads and not (tmp_path / "answers.system.json").exists()  # no label pinned on them
    assert out.read_text() == text  # neither the torn line cut nor the error row retried: not ours to touch


def test_a_benchmark_answers_file_is_not_resumed_as_infer_answers(loads, toy_dataset, toy_conversations, tmp_path,
                                                                 capsys):
    model = fake_model_folder(tmp_path / "m", b"w" * 64, 1_700_000_000)
    answers = tmp_path / "bench" / "answers" / "ours.jsonl"  # the same model, through benchmark's llava system
    answers.parent.mkdir(parents=True)
    answers.write_text('{"id": "000001", "answer": "Esplanadi"}\n')
    benchmark.record_answers_source(answers, benchmark.parse_system_spec(f"ours=llava:{model},max_new_tokens=8"))
    assert infer.main(_argv(toy_dataset, toy_conversations, model, answers)) == 2
    err = capsys.readouterr().err
    assert f"was written by llava:{model.resolve()},max_new_tokens=8" in err and "given now: infer:" in err
    assert not loads


def test_out_is_not_a_record_and_its_record_is_no_input(loads, toy_dataset, toy_conversations, tmp_path, capsys):
    model = fake_model_folder(tmp_path / "m", b"w" * 64, 1_700_000_000)
    record = tmp_path / "answers.system.json"
    assert infer.main(_argv(toy_dataset, toy_conversations, model, record)) == 2
    assert "a .system.json file is the record of what wrote an answers file" in capsys.readouterr().err
    assert not record.exists()
    split = tmp_path / "split.system.json"  # an input named like the record of --out split.jsonl
    shutil.copy(toy_conversations / "eval.json", split)
    argv = _argv(toy_dataset, toy_conversations, model, tmp_path / "split.jsonl")
    argv[argv.index("--eval") + 1] = str(split)
    assert infer.main(argv) == 2
    assert f"--out's record {split} is the input {split}" in capsys.readouterr().err
    (tmp_path / "folder.system.json").mkdir()
    assert infer.main(_argv(toy_dataset, toy_conversations, model, tmp_path / "folder.jsonl")) == 2
    assert "is a folder; give a file path" in capsys.readouterr().err
    assert not loads and not (tmp_path / "split.jsonl").exists() and not (tmp_path / "folder.jsonl").exists()


def test_candidate_options_count_only_with_candidates(tmp_path):
    model = fake_model_folder(tmp_path / "m", b"w" * 64, 1_700_000_000)
    clip, data = tmp_path / "clip.pt", tmp_path / "data"
    clip.write_bytes(b"clip")
    data.mkdir()
    (data / "records.parquet").write_bytes(b"PAR1")
    base = ["--model", str(model), "--eval", "e.json", "--image-root", "i", "--out", "a.jsonl"]

    def source(*more):
        return infer.infer_answers_source(infer.build_parser().parse_args(base + list(more)))

    assert source("--top-k", "3", "--candidate-scores", "--batch-size", "1", "--device", "cuda") == source()
    grounded = source("--candidates", str(clip), "--dataset", str(data), "--top-k", "3")
    assert grounded["options"]["top_k"] == 3 and grounded["options"]["candidate_scores"] is False
    assert grounded["options"]["candidates"] == str(clip.resolve())
    assert set(grounded["contents"]) == {"target", "candidates", "dataset"}
    assert grounded != source("--candidates", str(clip), "--dataset", str(data), "--top-k", "5")


def test_an_adapter_base_replaced_in_place_is_refused(loads, toy_dataset, toy_conversations, tmp_path, capsys):
    base = fake_model_folder(tmp_path / "base", b"base" * 16, 1_700_000_000)
    tower = fake_model_folder(tmp_path / "tower", b"tower" * 16, 1_700_000_000)
    adapter = fake_adapter_checkpoint(tmp_path / "checkpoint-000010", base, tower)
    out = tmp_path / "answers.jsonl"
    argv = ["--adapter", str(adapter), "--eval", str(toy_conversations / "eval.json"), "--image-root",
            str(toy_dataset / "images"), "--out", str(out), "--device", "cpu"]
    assert infer.main([*argv, "--limit", "2"]) == 0
    record = json.loads((tmp_path / "answers.system.json").read_text())
    assert set(record["contents"]) == {"adapter", "adapter_base", "adapter_vision_tower"}
    assert record["options"]["adapter_base"] == str(base.resolve())
    assert infer.main([*argv, "--limit", "4"]) == 0  # unchanged: resumed
    capsys.readouterr()

    shutil.rmtree(base)  # the base the checkpoint names, re-merged in place
    fake_model_folder(base, b"other" * 16, 1_700_000_500)
    assert infer.main([*argv, "--limit", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was written by" in err
    assert len(loads) == 2 and len(out.read_text().splitlines()) == 4
    # with --model, the stored base is replaced and not part of the record; the stored tower still is
    with_model = infer.infer_answers_source(infer.build_parser().parse_args([*argv, "--model", str(base)]))
    assert set(with_model["contents"]) == {"target", "adapter", "adapter_vision_tower"}
