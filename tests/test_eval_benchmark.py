"""Batch inference (batched = one by one, resumable, bad input) and the benchmark over several systems."""

import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from llava_address.eval import answers, benchmark, infer

# A Vicuna-style chat template so transformers' image-text-to-text pipeline can prompt the tiny model.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {{ m['content'] if m['content'] is string else m['content'][0]['text'] }}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_llava(tiny_llava_dir):
    """The session's tiny LLaVA folder (conftest, read-only)."""
    return tiny_llava_dir


@pytest.fixture(scope="module")
def tiny_llava_with_template(tiny_llava_dir, tmp_path_factory):
    """A copy of the tiny LLaVA whose processor has a chat template, as hub models have for the pipeline."""
    from transformers import AutoProcessor

    out = tmp_path_factory.mktemp("tiny-llava-chat") / "llava"
    shutil.copytree(tiny_llava_dir, out)
    processor = AutoProcessor.from_pretrained(out)
    processor.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def eval_split(toy_conversations):
    """The conversation builder's evaluation split of the toy dataset (conftest)."""
    return toy_conversations / "eval.json"


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 24 + 6 * i, 3), dtype=np.uint8)) for i in range(n)]


def test_batched_left_padded_generation_equals_one_by_one(tiny_llava):
    gen = infer.load_generator(tiny_llava, device="cpu")
    questions = ["Where was this photo taken?", "What street is this?", "Which neighbourhood is this, exactly? Tell me."]
    convs = [[infer.user_turn(q, True)] for q in questions]
    ids = [gen.prompt_ids(c) for c in convs]
    assert len({len(x) for x in ids}) > 1  # the batch really needs padding
    image_id = gen.model.config.image_token_id
    assert all(x.count(image_id) == infer.num_image_tokens(gen.model.config) for x in ids)
    inputs = gen.batch_inputs(convs, _images(3))
    assert (inputs["attention_mask"][:, -1] == 1).all() and (inputs["attention_mask"][:, 0] == 0).any()  # left pad
    batched = gen.generate(convs, _images(3), max_new_tokens=10)
    single = [gen.generate([c], [im], max_new_tokens=10)[0] for c, im in zip(convs, _images(3))]
    assert batched == single
    assert any(batched)


def test_images_are_padded_to_square_exactly_as_in_training(tiny_llava):
    import torch

    from llava_address.data import expand_to_square, mean_colour

    gen = infer.load_generator(tiny_llava, device="cpu")
    im = _images(3)[2]  # 32 x 36: not square
    ip = gen.processor.image_processor
    padded = ip(images=[expand_to_square(im, mean_colour(ip))], return_tensors="pt")["pixel_values"]
    assert torch.equal(gen.pixel_values([im]), padded)
    gen.pad_to_square = False
    assert not torch.equal(gen.pixel_values([im]), padded)


def test_infer_cli_is_resumable_and_keeps_partial_results(tiny_llava, toy_dataset, eval_split, tmp_path):
    out = tmp_path / "answers.jsonl"
    common = ["--model", str(tiny_llava), "--eval", str(eval_split), "--image-root", str(toy_dataset / "images"),
              "--out", str(out), "--batch-size", "3", "--max-new-tokens", "4", "--device", "cpu"]
    assert infer.main(common + ["--limit", "5"]) == 0
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(first) == 5 and all(set(r) >= {"id", "question", "answer", "reference"} for r in first)
    assert first[0]["reference"]["sub_street"] and "<image>" not in first[0]["question"]
    with out.open("a") as f:
        f.write('{"id": "torn-wri')  # a run killed in the middle of a write
    assert infer.main(common + ["--limit", "9"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows[:5]] == [r["id"] for r in first]  # kept, not regenerated
    assert len(rows) == 9 and len({r["id"] for r in rows}) == 9

    # A missing image becomes an error row; the run goes on and the good records of its batch are kept.
    recs = json.loads(eval_split.read_text())[:7]
    recs[5]["image"] = "nowhere/missing.png"
    bad_eval = tmp_path / "bad_eval.json"
    bad_eval.write_text(json.dumps(recs))
    out2 = tmp_path / "answers2.jsonl"
    argv2 = ["--model", str(tiny_llava), "--eval", str(bad_eval), "--image-root", str(toy_dataset / "images"),
             "--out", str(out2), "--batch-size", "3", "--max-new-tokens", "2", "--device", "cpu"]
    assert infer.main(argv2) == 0
    rows = [json.loads(line) for line in out2.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in recs]
    bad = rows[5]
    assert "answer" not in bad and "not found" in bad["error"] and str(toy_dataset) not in bad["error"]
    assert all("answer" in r for i, r in enumerate(rows) if i != 5)
    assert infer.main(argv2) == 0 and len(out2.read_text().splitlines()) == 7  # error rows count as done
    assert infer.main(argv2 + ["--retry-errors"]) == 0  # retried (still missing): one error row, not two
    rows = [json.loads(line) for line in out2.read_text().splitlines()]
    assert len(rows) == 7 and sum("error" in r for r in rows) == 1


def test_unloadable_models_and_foreign_output_files_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(infer.InferenceInputError, match="no config.json"):
        infer.load_generator(tmp_path / "empty", device="cpu")
    with pytest.raises(infer.InferenceInputError, match="not a folder"):
        infer.load_generator(None, tmp_path / "nope", device="cpu")
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("hello\n")
    with pytest.raises(infer.InferenceInputError, match="refusing to append"):
        answers.read_done_ids(foreign)
    conversations = tmp_path / "eval.jsonl"  # JSON lines with ids, but no answers: another command's output
    conversations.write_text('{"id": "1", "image": "1.png", "conversations": []}\n')
    with pytest.raises(infer.InferenceInputError, match="not an answers line"):
        answers.read_done_ids(conversations)
    notes = tmp_path / "notes.txt"  # one unterminated line is not a torn answer: left as it is
    notes.write_text("important notes, no newline at the end")
    with pytest.raises(infer.InferenceInputError, match="not an answers file"):
        answers.read_done_ids(notes)
    assert notes.read_text() == "important notes, no newline at the end"
    first = tmp_path / "first.jsonl"  # a first batch torn by a kill: nothing answered yet, the torn line goes
    first.write_text('{"id": "000001", "answ')
    assert answers.read_done_ids(first) == set() and first.read_bytes() == b""


def test_appended_answers_survive_short_writes(tmp_path, monkeypatch):
    import os as os_module

    real_write = os_module.write
    monkeypatch.setattr(answers.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))  # 7 bytes a call
    out = tmp_path / "a.jsonl"
    answers.append_lines(out, [{"id": "1", "answer": "Esplanadi"}, {"id": "2", "answer": "Mannerheimintie"}])
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["1", "2"]


def test_retrieval_answers_yes_no_by_whether_its_top1_is_the_named_place(toy_dataset):
    from clip_stage.gallery import gallery_from_dataset
    from llava_address.eval.gazetteer import Gazetteer

    gazetteer = Gazetteer.from_dataset(toy_dataset)
    top1 = next(c for c in gallery_from_dataset(toy_dataset).candidates if c.sub_streets == {"Aleksanterinkatu/1"})

    def verdict(question):
        answer = benchmark.verify_by_top1(question, top1, gazetteer)
        return None if answer is None else answer.split(".")[0]

    assert verdict("Is this place Aleksanterinkatu between Kaivokatu and Fredrikinkatu? Answer yes or no.") == "Yes"
    assert verdict("Is this place Aleksanterinkatu between Mikonkatu and Kaivokatu? Answer yes or no.") == "No"
    assert verdict("A friend claims this is Aleksanterinkatu near Fredrikinkatu. Are they right?") == "Yes"
    assert verdict("A friend claims this is Aleksanterinkatu near Annankatu. Are they right?") == "No"
    assert verdict("Was this photo taken on Aleksanterinkatu?") == "Yes"
    assert verdict("Was this photo taken on Bulevardi?") == "No"
    assert verdict("Where was this photo taken?") is None  # names no place: an open question
    assert verdict("What is near Aleksanterinkatu?") is None  # names a place but asks no verdict
    assert benchmark.verify_by_top1("Was this photo taken on Bulevardi?", top1, gazetteer).endswith(f"{top1.text}.")


def test_system_specs_and_kind_registry():
    spec = benchmark.parse_system_spec("ours=llava:runs/merged,adapter=runs/ckpt,max_new_tokens=32")
    assert (spec.name, spec.kind, spec.target, spec.options) == (
        "ours", "llava", "runs/merged", {"adapter": "runs/ckpt", "max_new_tokens": "32"})
    with pytest.raises(benchmark.BenchmarkError, match=r"valid: \['clip', 'hf', 'jsonl', 'llava'\]"):
        benchmark.parse_system_spec("x=gpt:foo")
    with pytest.raises(benchmark.BenchmarkError, match="NAME=KIND:TARGET"):
        benchmark.parse_system_spec("just-a-path")
    with pytest.raises(ValueError, match="already registered"):
        benchmark.register_system_kind(benchmark.SystemKind("llava", "dup", None))
    assert benchmark.choices_in_question("Which one?\nA. Esplanadi\nB. Bulevardi\nAnswer with the letter.") == [
        ("A", "Esplanadi"), ("B", "Bulevardi")]


def test_benchmark_scores_every_system_and_reports_failures(tiny_llava, tiny_llava_with_template, toy_dataset,
                                                           eval_split, tmp_path):
    recs = json.loads(eval_split.read_text())[:8]
    small_eval = tmp_path / "eval.json"
    small_eval.write_text(json.dumps(recs))
    # A "closed model" that answers exactly what the builder expects.
    imported = tmp_path / "closed.jsonl"
    imported.write_text("".join(json.dumps({"id": r["id"], "answer": r["conversations"][1]["value"]}) + "\n"
                                for r in recs))
    # ... and one that answered only half of them (counted wrong on the rest, in the table)
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps({"id": r["id"], "answer": r["conversations"][1]["value"]}) + "\n"
                               for r in recs[:4]))
    out = tmp_path / "bench"
    broken = tmp_path / "no-such-model"  # passes the up-front checks (a folder with a config), fails to load
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    argv = ["--dataset", str(toy_dataset), "--eval", str(small_eval), "--out", str(out), "--device", "cpu",
            "--batch-size", "4", "--max-new-tokens", "4",
            "--system", f"ours=llava:{tiny_llava}",
            "--system", "addressclip=clip:,model=addressclip-tiny",
            "--system", f"hf-model=hf:{tiny_llava_with_template}",
            "--system", f"closed=jsonl:{imported}",
            "--system", f"partial=jsonl:{partial}",
            "--system", f"broken=llava:{tmp_path / 'no-such-model'}"]
    assert benchmark.main(argv) == 1  # one system failed
    results = json.loads((out / "benchmark.json").read_text())
    assert set(results) == {"ours", "addressclip", "hf-model", "closed", "partial", "broken"}
    assert "error" in results["broken"] and "no-such-model" in results["broken"]["error"]
    closed = results["closed"]["report"]
    assert all(m["correct"] == m["total"] for m in closed["metrics"].values())
    for name in ("ours", "addressclip", "hf-model"):
        assert results[name]["report"]["n_answers"] == len(recs)
        assert len((out / "answers" / f"{name}.jsonl").read_text().splitlines()) == len(recs)
    # Retrieval always names a gallery address: its address answers all parse.
    clip = results["addressclip"]["report"]
    assert not [u for u in clip["unparseable"] if u["question_type"] in ("full", "street", "cross", "neighbourhood")]
    table = (out / "benchmark.md").read_text()
    part = results["partial"]["report"]
    assert part["n_answers"] == 4 and all(m["correct"] == m["total"] for m in part["metrics"].values())
    strict_totals = {k: m["total"] for k, m in part["strict_metrics"].items()}
    assert strict_totals == {k: m["total"] for k, m in closed["metrics"].items()}  # one denominator for all
    assert sum(strict_totals.values()) > sum(m["total"] for m in part["metrics"].values())
    row = next(line for line in table.splitlines() if line.startswith("| partial |"))
    assert "| 4/8 |" in row
    for m in part["strict_metrics"].values():
        if m["total"]:
            assert f"({m['correct']}/{m['total']})" in row
    # the by-wording table divides by the same questions: the unanswered half shows there too
    wording_row = [line for line in table.splitlines() if line.startswith("| partial |")][1]
    shown = re.findall(r"(\d+)%", wording_row)
    assert shown and any(int(v) < 100 for v in shown)
    assert table.count("\n| ") >= 5 and "| broken | llava | failed" in table and "100.0%" in table
    png = out / "benchmark.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 400

    # Rerunning answers nothing new (resumable) and gives the same scores.
    shutil.rmtree(out / "answers" / "hf-model.jsonl", ignore_errors=True)
    again = benchmark.run_benchmark([benchmark.parse_system_spec(f"ours=llava:{tiny_llava}")], toy_dataset,
                                    small_eval, out, ctx=benchmark.RunContext(toy_dataset, "cpu", max_new_tokens=4),
                                    progress=False)
    assert again["ours"]["counts"] == {"total": len(recs), "skipped": len(recs), "answered": 0, "errors": 0}
    assert again["ours"]["report"]["metrics"] == results["ours"]["report"]["metrics"]


def test_adapter_checkpoints_load_merged_with_the_trained_weights(tiny_llava, tmp_path):
    """A train-llava checkpoint (LoRA + projector) loads on its base: logits equal the adapter model's."""
    import torch

    from llava_address.config import ModelArgs, TrainablesArgs
    from llava_address.checkpoint import save_model_part
    from llava_address.model import build_llava
    from llava_address.trainables import apply_trainables

    margs = ModelArgs(model_name_or_path=str(tiny_llava))
    targs = TrainablesArgs(lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model, processor = build_llava(margs)
    peft_model, _ = apply_trainables(model, targs)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "multi_modal_projector" in name:
                p.add_(0.05 * torch.randn_like(p))  # stand-in for training
    ckpt = tmp_path / "checkpoint-1"
    save_model_part(peft_model, processor, ckpt, margs, targs)

    gen = infer.load_generator(None, ckpt, device="cpu")
    base = infer.load_generator(tiny_llava, device="cpu")
    assert not hasattr(gen.model, "peft_config")  # merged for generation
    inputs = gen.batch_inputs([[infer.user_turn("Where was this photo taken?", True)]], _images(1))
    with torch.no_grad():
        peft_model.eval()
        want = peft_model(**inputs).logits
        got = gen.model(**inputs).logits
        untuned = base.model(**inputs).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, untuned, atol=1e-3)


def test_imported_answers_are_scored_on_the_limited_split_and_bad_rows_are_skipped(toy_dataset, eval_split, tmp_path):
    recs = json.loads(eval_split.read_text())[:8]
    small_eval = tmp_path / "eval.json"
    small_eval.write_text(json.dumps(recs))
    imported = tmp_path / "closed.jsonl"  # answers for the whole split, one line torn by hand
    imported.write_text("{torn\n" + "".join(json.dumps({"id": r["id"], "answer": r["conversations"][1]["value"]})
                                            + "\n" for r in recs))
    out = tmp_path / "bench"
    results = benchmark.run_benchmark([benchmark.parse_system_spec(f"closed=jsonl:{imported}")], toy_dataset,
                                      small_eval, out, limit=4, progress=False)
    report = results["closed"]["report"]
    assert "error" not in results["closed"]
    assert report["n_eval"] == report["n_answers"] == 4
    assert report["bad_rows"] == [{"where": "line 1", "error": report["bad_rows"][0]["error"]}]
    assert all(m["correct"] == m["total"] for m in report["metrics"].values())


def test_resumed_answers_must_come_from_the_same_system(toy_dataset, eval_split, tmp_path):
    out = tmp_path / "bench"
    answers = out / "answers" / "ours.jsonl"
    answers.parent.mkdir(parents=True)
    answers.write_text('{"id": "x", "answer": "Esplanadi"}\n')
    for model in ("merged", "base"):
        (tmp_path / model).mkdir()
        (tmp_path / model / "config.json").write_text("{}")
    benchmark.record_answers_source(answers, benchmark.parse_system_spec(f"ours=llava:{tmp_path / 'merged'}"))
    benchmark.check_answers_source(answers, benchmark.parse_system_spec(f"ours=llava:{tmp_path / 'merged'}"))
    # the message names what wrote the answers and what is given now (test_eval_benchmark_provenance.py)
    with pytest.raises(benchmark.BenchmarkError, match=r"was written by llava:.*merged.*given now: llava:.*base"):
        benchmark.run_benchmark([benchmark.parse_system_spec(f"ours=llava:{tmp_path / 'base'}")], toy_dataset,
                                eval_split, out, progress=False)
    assert answers.read_text() == '{"id": "x", "answer": "Esplanadi"}\n'  # nothing deleted


def test_system_specs_are_checked_before_any_system_loads(toy_dataset, eval_split, tmp_path):
    imported = tmp_path / "closed.jsonl"
    imported.write_text('{"id": "x", "answer": "Esplanadi"}\n')
    (tmp_path / "noconf").mkdir()
    for spec, message in ((f"ours=llava:{tmp_path / 'noconf'}", "no config.json"),
                          (f"ours=llava:{tmp_path / 'merged'}", "not found"),
                          (f"ours=llava:llava-hf/llava-1.5-7b-hf,bogus=1", r"unknown option\(s\) \['bogus'\]"),
                          (f"ours=llava:llava-hf/llava-1.5-7b-hf,candidates={tmp_path / 'clip'}", "candidates"),
                          ("ours=llava:llava-hf/llava-1.5-7b-hf,top_k=3", "give candidates= too"),
                          ("ours=llava:llava-hf/llava-1.5-7b-hf,max_new_tokens=0", "max_new_tokens=0"),
                          ("ours=llava:llava-hf/llava-1.5-7b-hf,pad_to_square=maybe", "must be true or false"),
                          ("ours=llava:llava-hf/llava-1.5-7b-hf,candidate_scores=true", "give candidates= too"),
                          (f"gpt=jsonl:{tmp_path / 'nope.jsonl'}", "nope.jsonl: not found")):
        # the good system first: it must not run (or write anything) before the bad spec is refused
        with pytest.raises(benchmark.BenchmarkError, match=message):
            benchmark.run_benchmark([benchmark.parse_system_spec(f"closed=jsonl:{imported}"),
                                     benchmark.parse_system_spec(spec)], toy_dataset, eval_split, tmp_path / "bench",
                                    progress=False)
        assert not (tmp_path / "bench").exists()
