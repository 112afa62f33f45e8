"""The benchmark resumes only answers provably written by the model it is given (NAME.system.json with a
fingerprint of the model folder's files), and a smaller --limit leaves earlier answers beyond it unscored.

The llava loader is replaced by a stand-in that answers at once, so each test runs in about a second."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest

from clip_stage.core.fs import contents_fingerprint
from llava_address.eval import benchmark
from tests.llava_helpers import fake_adapter_checkpoint, fake_model_folder


@pytest.fixture
def loads(monkeypatch):
    """Every llava model 'loaded' (its folder), answered by a stand-in: no weights are read."""
    loaded = []

    def load_generator(model, adapter=None, device="cpu", dtype="auto"):
        loaded.append(model)
        return SimpleNamespace()

    monkeypatch.setattr(benchmark, "load_generator", load_generator)
    monkeypatch.setattr(benchmark, "llava_answer_batch",
                        lambda gen, max_new_tokens: lambda questions, images: ["Esplanadi"] * len(questions))
    return loaded


def _argv(toy_dataset, eval_split, out, system, limit):
    return ["--dataset", str(toy_dataset), "--eval", str(eval_split), "--out", str(out), "--device", "cpu",
            "--system", system, "--limit", str(limit)]


def test_contents_fingerprint_follows_the_files_not_the_card_or_the_folder_name(tmp_path):
    model = fake_model_folder(tmp_path / "m", b"w" * 64, 1_700_000_000)
    first = contents_fingerprint(model)
    assert first["files"] == 2 and first == contents_fingerprint(model)
    (model / "README.md").write_text("a model card, rewritten")  # documentation and markers: not the model
    (model / ".address-llava.json").write_text('{"kind": "merge"}')
    assert contents_fingerprint(model) == first
    moved = tmp_path / "elsewhere"
    model.rename(moved)  # mv keeps the files: the same model
    assert contents_fingerprint(moved) == first
    os.utime(moved / "model.safetensors", ns=(1_700_000_100 * 10**9,) * 2)  # rewritten, same size
    assert contents_fingerprint(moved)["sha256"] != first["sha256"]


def test_a_model_replaced_in_the_same_folder_is_refused_before_it_loads(loads, toy_dataset, toy_conversations,
                                                                      tmp_path, capsys):
    model = fake_model_folder(tmp_path / "m", b"merged" * 10, 1_700_000_000)
    out = tmp_path / "bench"
    argv = _argv(toy_dataset, toy_conversations / "eval.json", out, f"x=llava:{model}", 4)
    assert benchmark.main(argv) == 0
    assert benchmark.main(argv) == 0  # the same model: resumed (nothing answered twice)
    answers = out / "answers" / "x.jsonl"
    assert len(answers.read_text().splitlines()) == 4 and len(loads) == 2
    written, recorded = answers.read_bytes(), (out / "answers" / "x.system.json").read_bytes()
    capsys.readouterr()

    shutil.rmtree(model)  # like `merge --overwrite` of another checkpoint into the same folder
    fake_model_folder(model, b"base" * 10, 1_700_000_500)
    assert benchmark.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"system x: {answers} was written by llava:{model.resolve()}" in err and "given now:" in err
    assert "another --out or another system name" in err
    assert len(loads) == 2  # refused before anything loaded
    assert answers.read_bytes() == written and (out / "answers" / "x.system.json").read_bytes() == recorded


def test_answers_without_a_record_are_refused_not_adopted(loads, toy_dataset, toy_conversations, tmp_path, capsys):
    model = fake_model_folder(tmp_path / "m", b"merged" * 10, 1_700_000_000)
    out = tmp_path / "bench"  # an answers folder from before records were kept (or copied in)
    (out / "answers").mkdir(parents=True)
    (out / "answers" / "x.jsonl").write_text('{"id": "000001", "answer": "Esplanadi"}\n')
    (out / "benchmark.json").write_text("{}")
    (out / "benchmark.md").write_text("")
    assert benchmark.main(_argv(toy_dataset, toy_conversations / "eval.json", out, f"x=llava:{model}", 4)) == 2
    err = capsys.readouterr().err
    assert "x.jsonl has no record of the model that wrote it" in err and "another --out" in err
    assert not loads and not (out / "answers" / "x.system.json").exists()  # no label pinned on them
    assert (out / "answers" / "x.jsonl").read_text() == '{"id": "000001", "answer": "Esplanadi"}\n'


def test_records_from_before_contents_were_fingerprinted(tmp_path):
    answers = tmp_path / "answers" / "x.jsonl"
    answers.parent.mkdir()
    answers.write_text('{"id": "1", "answer": "Esplanadi"}\n')
    model = fake_model_folder(tmp_path / "m", b"merged", 1_700_000_000)
    old = answers.with_suffix(".system.json")
    old.write_text(json.dumps({"kind": "llava", "target": str(model.resolve()), "options": {}}))
    with pytest.raises(benchmark.BenchmarkError, match="contents not recorded: written before the benchmark"):
        benchmark.check_answers_source(answers, benchmark.parse_system_spec(f"x=llava:{model}"))
    # a hub id has no local contents: its id is the whole record, then and now
    old.write_text(json.dumps({"kind": "llava", "target": "llava-hf/llava-1.5-7b-hf", "options": {}}))
    hub = benchmark.parse_system_spec("x=llava:llava-hf/llava-1.5-7b-hf")
    assert benchmark.check_answers_source(answers, hub)["contents"] == {}
    with pytest.raises(benchmark.BenchmarkError, match="by llava:llava-hf/llava-1.5-7b-hf .*now: llava:llava-hf/.*13b"):
        benchmark.check_answers_source(answers, benchmark.parse_system_spec("x=llava:llava-hf/llava-1.5-13b-hf"))


def test_answers_beyond_a_smaller_limit_are_not_scored(loads, toy_dataset, toy_conversations, tmp_path):
    model = fake_model_folder(tmp_path / "m", b"merged" * 10, 1_700_000_000)
    out = tmp_path / "bench"
    eval_split = toy_conversations / "eval.json"
    assert benchmark.main(_argv(toy_dataset, eval_split, out, f"x=llava:{model}", 6)) == 0
    assert benchmark.main(_argv(toy_dataset, eval_split, out, f"x=llava:{model}", 3)) == 0
    res = json.loads((out / "benchmark.json").read_text())["x"]
    assert res["counts"] == {"total": 3, "skipped": 3, "answered": 0, "errors": 0}
    assert res["report"]["n_eval"] == res["report"]["n_answers"] == 3 and res["report"]["bad_rows"] == []
    # an id that is in no split is still a bad row
    with (out / "answers" / "x.jsonl").open("a") as f:
        f.write('{"id": "not-a-question", "answer": "Esplanadi"}\n')
    assert benchmark.main(_argv(toy_dataset, eval_split, out, f"x=llava:{model}", 3)) == 0
    bad = json.loads((out / "benchmark.json").read_text())["x"]["report"]["bad_rows"]
    assert len(bad) == 1 and "'not-a-question' is not in the evaluation split" in bad[0]["error"]


def test_an_adapter_vision_tower_replaced_in_place_is_refused(tmp_path):
    base = fake_model_folder(tmp_path / "base", b"base" * 16, 1_700_000_000)
    tower = fake_model_folder(tmp_path / "tower", b"tower" * 16, 1_700_000_000)
    adapter = fake_adapter_checkpoint(tmp_path / "checkpoint-000010", base, tower)
    spec = benchmark.parse_system_spec(f"x=llava:{base},adapter={adapter}")
    answers = tmp_path / "answers" / "x.jsonl"
    answers.parent.mkdir()
    answers.write_text('{"id": "1", "answer": "Esplanadi"}\n')
    benchmark.record_answers_source(answers, spec)
    recorded = benchmark.check_answers_source(answers, spec)  # unchanged: resumed
    assert set(recorded["contents"]) == {"target", "adapter", "adapter_vision_tower"}
    shutil.rmtree(tower)  # the tower the checkpoint swapped in, exported again in place
    fake_model_folder(tower, b"other" * 16, 1_700_000_500)
    with pytest.raises(benchmark.BenchmarkError, match="was written by"):
        benchmark.check_answers_source(answers, spec)


def test_an_adapter_that_is_no_checkpoint_is_refused_before_out_is_made(toy_dataset, toy_conversations, tmp_path,
                                                                        capsys):
    base = fake_model_folder(tmp_path / "base", b"base" * 16, 1_700_000_000)
    (tmp_path / "not-a-checkpoint").mkdir()
    out = tmp_path / "bench"
    system = f"x=llava:{base},adapter={tmp_path / 'not-a-checkpoint'}"
    assert benchmark.main(_argv(toy_dataset, toy_conversations / "eval.json", out, system, 2)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "system 'x': adapter" in err and "no llava_args.json" in err
    assert not out.exists()
