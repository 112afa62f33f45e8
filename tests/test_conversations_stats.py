"""`conv-stats`: counts agree with the builder, tokenizer lengths, type recognition without metadata, PNG."""

import json

import pytest
from PIL import Image

from conversations import stats
from conversations.records import load_records, write_json_array


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A sentencepiece BPE tokenizer trained on address-like text, saved as a transformers Llama tokenizer."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    d = tmp_path_factory.mktemp("tok")
    lines = [f"This photo was taken on Street{i % 13}katu between Avenue{i % 7} and Road{i % 5}, Kluuvi, Helsinki."
             for i in range(300)]
    (d / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=120,
                                   model_type="bpe", minloglevel=2)
    tok = LlamaTokenizer(vocab_file=str(d / "sp.model"))
    tok.save_pretrained(str(d / "tokenizer"))
    return d / "tokenizer"


def test_counts_match_the_build(toy_conversations, tmp_path, capsys):
    info = json.loads((toy_conversations / "build_info.json").read_text())
    png, js = tmp_path / "s.png", tmp_path / "s.json"
    assert stats.main([str(toy_conversations / "train.json"), "--png", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert f"records            {info['train']['records']}" in out
    d = json.loads(js.read_text())
    assert d["question_types"] == info["train"]["question_types"]
    assert d["yes_no"] == info["train"]["yes_no"] and d["turns"] == info["train"]["turns"]
    assert set(d["turns_per_record"]) <= {"2", "3", "4"}
    assert d["answer_tokens"]["count"] == info["train"]["turns"]
    assert d["phrasing"] == {"seen": info["train"]["turns"]}
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 1000
    ev = stats.compute_stats(str(toy_conversations / "eval.json")).as_dict()
    assert ev["question_types"] == info["eval"]["question_types"]
    assert set(ev["phrasing"]) == {"seen", "held_out"}


def test_types_recognised_without_metadata_and_in_messages_form(toy_conversations, tmp_path):
    recs = load_records(toy_conversations / "train.json")
    for r in recs:
        del r["turn_types"]
    write_json_array(tmp_path / "plain.json", recs)
    expected = stats.compute_stats(str(toy_conversations / "train.json")).as_dict()
    plain = stats.compute_stats(str(tmp_path / "plain.json")).as_dict()
    assert plain["question_types"] == expected["question_types"] and plain["yes_no"] == expected["yes_no"]
    msgs = stats.compute_stats(str(toy_conversations / "train_messages.json")).as_dict()
    assert msgs["question_types"] == expected["question_types"] and msgs["records"] == expected["records"]


def test_foreign_file_counts_other_and_malformed(tmp_path):
    recs = [{"id": "1", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the bus?"}, {"from": "gpt", "value": "Red and white."},
        {"from": "human", "value": "Is this Esplanadi?"}, {"from": "gpt", "value": "No, it is Bulevardi."}]},
        {"id": "2", "conversations": "broken"}]
    write_json_array(tmp_path / "f.json", recs)
    d = stats.compute_stats(str(tmp_path / "f.json")).as_dict()
    assert d["records"] == 1 and d["malformed"] == 1
    assert d["question_types"] == {"other": 1, "yes_no": 1} and d["yes_no"] == {"no": 1}
    assert d["answer_tokens"]["min"] == 3 and d["answer_tokens"]["max"] == 4  # whitespace words


def test_answer_lengths_with_a_tokenizer(toy_conversations, tiny_tokenizer, tmp_path, capsys):
    from transformers import AutoTokenizer

    path = toy_conversations / "eval.json"
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    answers = [r["conversations"][1]["value"] for r in load_records(path)]
    expected = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers]
    assert stats.main([str(path), "--tokenizer", str(tiny_tokenizer), "--json", str(tmp_path / "t.json")]) == 0
    d = json.loads((tmp_path / "t.json").read_text())
    assert d["tokenizer"] == str(tiny_tokenizer)
    assert d["answer_tokens"]["max"] == max(expected) and d["answer_tokens"]["min"] == min(expected)
    assert d["answer_tokens"]["mean"] == pytest.approx(sum(expected) / len(expected), abs=0.01)
    words = stats.compute_stats(str(path)).as_dict()["answer_tokens"]
    assert words["mean"] != d["answer_tokens"]["mean"]
    assert f"{tiny_tokenizer} tokens" in capsys.readouterr().out


@pytest.mark.parametrize("tokenizer, message", [("./nosuch", "no such folder"), ("{empty}", "not a tokenizer folder")])
def test_a_bad_tokenizer_is_one_line_before_anything_loads(tokenizer, message, toy_conversations, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [str(toy_conversations / "eval.json"), "--tokenizer", tokenizer.format(empty=tmp_path / "empty")]
    assert stats.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "--tokenizer" in err


def test_missing_file(tmp_path, capsys):
    assert stats.main([str(tmp_path / "none.json")]) == 2
    assert "none.json: no such file" in capsys.readouterr().err
