"""The conversation builder on the toy dataset: determinism, splits, balance, negatives, references, exports."""

import json
import re
import shutil

import pytest

from clip_stage.core.schema import DatasetPaths, read_records
from conversations import build
from conversations.neighbours import build_neighbourhood
from conversations.records import REFERENCE_KEYS, Reference, load_records
from conversations.templates import QUESTION_TYPES, classify_question, template_regex
from llava_address.apps import cli


def _build(dataset, out, *extra):
    return build.main(["--dataset", str(dataset), "--out", str(out), *extra])


def _load(path):
    return load_records(path)


@pytest.fixture(scope="module")
def records(toy_dataset):
    return read_records(toy_dataset).set_index("image_id")


@pytest.fixture(scope="module")
def yes_no_heavy(toy_dataset, tmp_path_factory):
    """Every eval question and most training turns are yes/no; eval always uses held-out phrasings."""
    out = tmp_path_factory.mktemp("yn") / "conv"
    assert _build(toy_dataset, out, "--type-weights", "yes_no=5,street=1", "--eval-type-weights", "yes_no=1",
                  "--eval-held-out-prob", "1", "--seed", "3", "--sub-street-prob", "0.5") == 0
    return out


def test_deterministic_per_seed(toy_dataset, toy_conversations, tmp_path):
    assert _build(toy_dataset, tmp_path / "again") == 0
    for name in ("train.json", "eval.json"):
        assert (tmp_path / "again" / name).read_bytes() == (toy_conversations / name).read_bytes()
    assert _build(toy_dataset, tmp_path / "other", "--seed", "1") == 0
    assert (tmp_path / "other" / "train.json").read_bytes() != (toy_conversations / "train.json").read_bytes()


def test_train_and_eval_come_from_their_splits(toy_conversations, records):
    train, evaluation = _load(toy_conversations / "train.json"), _load(toy_conversations / "eval.json")
    assert {r["id"] for r in train} == set(records.index[records["split"] == "train"])
    assert {r["id"] for r in evaluation} == set(records.index[records["split"] == "test"])
    for r in train + evaluation:
        assert r["image"] == records.loc[r["id"], "image"]
    info = json.loads((toy_conversations / "build_info.json").read_text())
    assert info["image_root"] == str(DatasetPaths(info["dataset"]).images)
    assert info["train"]["records"] == len(train) and info["eval"]["records"] == len(evaluation)


def test_conversation_shape(toy_conversations):
    train = _load(toy_conversations / "train.json")
    seen_types = set()
    for r in train:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in conv) == 1
        assert 2 <= len(conv) // 2 <= 4 and len(r["turn_types"]) == len(conv) // 2
        assert len(set(r["turn_types"])) == len(r["turn_types"])  # no type twice in one conversation
        seen_types.update(r["turn_types"])
    # every type of the default weights occurs on 108 images ('scene', the base model's type, has weight 0)
    assert seen_types == set(QUESTION_TYPES) - {"scene"}
    for r in _load(toy_conversations / "eval.json"):
        assert len(r["conversations"]) == 2 and r["conversations"][0]["value"].startswith("<image>\n")


def test_turn_count_and_weights_are_configurable(toy_dataset, tmp_path):
    assert _build(toy_dataset, tmp_path / "c", "--min-turns", "1", "--max-turns", "1",
                  "--type-weights", "street=1,caption=0", "--conversations-per-image", "2") == 0
    train = _load(tmp_path / "c" / "train.json")
    assert len(train) == 2 * 108 and len({r["id"] for r in train}) == len(train)
    assert all(r["turn_types"] == ["street"] for r in train)


def test_answers_always_name_the_address(toy_conversations, records):
    for name in ("train.json", "eval.json"):
        for r in _load(toy_conversations / name):
            row = records.loc[r["id"]]
            for turn in r["conversations"][1::2]:
                text = turn["value"]
                assert row["street"] in text or row["neighbourhood"] in text, text
                assert not re.search(r"cannot|can't|unable|sorry|not possible", text, re.I), text


def _yes_no_turns(recs):
    for r in recs:
        types = r.get("turn_types") or [r["question_type"]]
        for t, q, a in zip(types, r["conversations"][0::2], r["conversations"][1::2]):
            if t == "yes_no":
                yield r, q["value"], a["value"]


def test_yes_no_balanced(toy_conversations, yes_no_heavy):
    for out in (toy_conversations, yes_no_heavy):
        for name in ("train.json", "eval.json"):
            answers = [a.split(maxsplit=1)[0].strip(".,:") for _, _, a in _yes_no_turns(_load(out / name))]
            assert set(answers) <= {"Yes", "No"}
            assert abs(answers.count("Yes") - answers.count("No")) <= 1, (out, name)
    evaluation = _load(yes_no_heavy / "eval.json")
    assert len(evaluation) == 36 and all(r["question_type"] == "yes_no" for r in evaluation)
    assert sum(r["reference"]["expected_answer"] == "yes" for r in evaluation) == 18


def test_yes_no_negatives_are_nearby_or_siblings(toy_dataset, yes_no_heavy, records):
    hood = build_neighbourhood(read_records(toy_dataset), toy_dataset)
    levels = set()
    for r in _load(yes_no_heavy / "eval.json"):
        ref, answer = r["reference"], r["conversations"][1]["value"]
        assert ref["candidate"] in r["conversations"][0]["value"]
        assert answer.startswith("Yes" if ref["expected_answer"] == "yes" else "No")
        assert ref["address"] in answer  # even a "no" gives the right address
        levels.add(ref["candidate_level"])
        if ref["expected_answer"] == "yes":
            assert ref["candidate"] in (ref["street"], ref["address"].split(",")[0])
            continue
        neg = hood.addresses[ref["candidate_sub_street"]]
        if ref["candidate_level"] == "street":
            assert ref["candidate"] == neg.street != ref["street"]
            assert ref["candidate"] not in ref["cross_streets"]  # a corner may show its cross street
            assert ref["candidate_sub_street"] in hood.nearby[ref["sub_street"]][:8]
        else:
            assert neg.street == ref["street"] and ref["candidate_sub_street"] in hood.siblings[ref["sub_street"]]
            assert ref["candidate"].startswith(ref["street"] + " between ")
            assert ref["candidate"] != ref["address"].split(",")[0]
    assert levels == {"street", "sub_street"}


def test_neighbourhood_uses_geometry(toy_dataset, tmp_path):
    hood = build_neighbourhood(read_records(toy_dataset), toy_dataset)
    # Aleksanterinkatu/0 (y=0, x 0-200) touches Aleksanterinkatu/1; Esplanadi/0 is 150 m north
    assert hood.nearby["Aleksanterinkatu/0"][0] == "Aleksanterinkatu/1"
    assert hood.nearby["Aleksanterinkatu/0"].index("Esplanadi/0") < hood.nearby["Aleksanterinkatu/0"].index("Bulevardi/2")
    assert hood.siblings["Aleksanterinkatu/0"] == ("Aleksanterinkatu/1", "Aleksanterinkatu/2")
    # without sub_streets.geojson the image positions stand in
    copy = tmp_path / "ds"
    shutil.copytree(toy_dataset, copy, ignore=shutil.ignore_patterns("images"))
    (copy / "sub_streets.geojson").unlink()
    hood2 = build_neighbourhood(read_records(copy), copy)
    assert {k: set(v) for k, v in hood2.siblings.items()} == {k: set(v) for k, v in hood.siblings.items()}
    # centroids are 200 m apart along a street but 150 m across: only the geometry sees the junction
    assert hood2.nearby["Aleksanterinkatu/0"][:2] == ("Esplanadi/0", "Aleksanterinkatu/1")


def test_multiple_choice(toy_dataset, tmp_path):
    out = tmp_path / "mc"
    assert _build(toy_dataset, out, "--type-weights", "multiple_choice=1", "--eval-type-weights", "multiple_choice=1") == 0
    letters = set()
    for r in _load(out / "eval.json"):
        ref, q, a = r["reference"], r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert len(ref["choices"]) == 4 and len(set(ref["choices"])) == 4
        i = "ABCD".index(ref["expected_answer"])
        assert ref["choices"][i] == ref["correct_choice"] == ref["address"]
        for j, c in enumerate(ref["choices"]):
            assert f"{'ABCD'[j]}. {c}" in q
        assert re.match(rf"(The answer is )?{ref['expected_answer']}\b", a) and ref["address"] in a
        letters.add(ref["expected_answer"])
    assert letters == set("ABCD")  # shuffled


def test_eval_reference_fields(toy_conversations, records):
    for r in _load(toy_conversations / "eval.json"):
        ref, row = r["reference"], records.loc[r["id"]]
        assert set(ref) == set(REFERENCE_KEYS)
        assert ref["question_type"] == r["question_type"] in QUESTION_TYPES
        assert (ref["street"], ref["sub_street"], ref["neighbourhood"], ref["city"]) == (
            row["street"], row["sub_street"], row["neighbourhood"], row["city"])
        assert ref["cross_streets"] == list(row["cross_streets"])
        assert ref["address"] == row["address_full"] and ref["utm_x"] == pytest.approx(row["utm_x"])
        assert ref["expected_answer"]
        found = classify_question(r["conversations"][0]["value"])
        assert found == (ref["question_type"], ref["phrasing"] == "held_out")
        assert Reference.from_dict(ref).to_dict() == ref  # the builder writes exactly the contract's fields


def test_held_out_phrasings_never_in_training(toy_conversations, yes_no_heavy):
    held = [template_regex(q) for qt in QUESTION_TYPES.values() for q in qt.held_out]
    for out in (toy_conversations, yes_no_heavy):
        for r in _load(out / "train.json"):
            for turn in r["conversations"][0::2]:
                q = turn["value"].removeprefix("<image>\n")
                assert not any(p.match(q) for p in held), q
                assert classify_question(q) == (r["turn_types"][r["conversations"].index(turn) // 2], False)
    phrasing = [r["reference"]["phrasing"] for r in _load(toy_conversations / "eval.json")]
    assert {"seen", "held_out"} == set(phrasing)  # default mixes both, to compare
    assert {r["reference"]["phrasing"] for r in _load(yes_no_heavy / "eval.json")} == {"held_out"}


def test_captions_used_only_where_present(toy_dataset, toy_conversations, records, tmp_path):
    caption_turns = 0
    for r in _load(toy_conversations / "train.json"):
        for t, a in zip(r["turn_types"], r["conversations"][1::2]):
            if t == "caption":
                caption_turns += 1
                assert records.loc[r["id"], "caption"].removeprefix("a ") in a["value"]
    assert caption_turns > 0
    copy = tmp_path / "nocap"
    shutil.copytree(toy_dataset, copy, ignore=shutil.ignore_patterns("images"))
    df = read_records(copy)
    df["caption"] = ""
    df.to_parquet(copy / "records.parquet", index=False)
    assert _build(copy, tmp_path / "out", "--type-weights", "caption=5,street=1") == 0
    assert all(r["turn_types"] == ["street"] for r in _load(tmp_path / "out" / "train.json"))


def test_exports_messages_and_hf(toy_dataset, toy_conversations, tmp_path):
    train = _load(toy_conversations / "train.json")
    msgs = _load(toy_conversations / "train_messages.json")
    assert [m["id"] for m in msgs] == [r["id"] for r in train]
    for r, m in zip(train, msgs):
        assert m["images"] == [r["image"]]
        assert [x["role"] for x in m["messages"]] == ["user", "assistant"] * (len(m["messages"]) // 2)
        assert [x["content"] for x in m["messages"]] == [t["value"] for t in r["conversations"]]
    assert _load(toy_conversations / "train.jsonl") == train

    import datasets

    assert _build(toy_dataset, tmp_path / "hf", "--formats", "llava,messages-trl,hf-disk,hf-parquet") == 0
    dd = datasets.load_from_disk(str(tmp_path / "hf" / "hf"))
    assert dd["train"]["id"] == [r["id"] for r in train] and len(dd["eval"]) == 36
    assert dd["eval"][0]["reference"]["street"] and dd["train"][0]["images"] == [train[0]["image"]]
    pq = datasets.load_dataset("parquet", data_files=str(tmp_path / "hf" / "hf_parquet" / "train.parquet"))["train"]
    assert pq["id"] == dd["train"]["id"]
    trl = _load(tmp_path / "hf" / "train_messages_trl.json")[0]["messages"]
    assert trl[0]["content"][0] == {"type": "image"} and "<image>" not in json.dumps(trl)
    assert trl[0]["content"][1]["text"] == train[0]["conversations"][0]["value"].removeprefix("<image>\n")


def test_yaml_config_and_cli(toy_dataset, tmp_path, capsys):
    cfg = tmp_path / "conv.yaml"
    cfg.write_text(f"dataset: {toy_dataset}\nseed: 7\ntype_weights: {{street: 1}}\nmax_turns: 1\nmin_turns: 1\n")
    assert cli.main(["conversations", "--config", str(cfg), "--out", str(tmp_path / "y"), "--seed", "8"]) == 0
    info = json.loads((tmp_path / "y" / "build_info.json").read_text())
    assert info["config"]["seed"] == 8 and info["config"]["type_weights"] == "street=1"  # flag beats file
    assert "train: 108 conversations" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--type-weights", "streets=1"], "unknown question type 'streets'"),
    (["--type-weights", "street=-1"], "must be >= 0"),
    (["--min-turns", "3", "--max-turns", "2"], "min_turns <= max_turns"),
    (["--address-style", "nope"], "unknown address style 'nope'; valid: ["),
    (["--formats", "llava,csv"], "unknown formats"),
    (["--train-splits", "test"], "both training and evaluation"),
])
def test_bad_options_fail_clearly(toy_dataset, tmp_path, capsys, args, message):
    assert _build(toy_dataset, tmp_path / "x", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_existing_output_and_missing_dataset(toy_dataset, toy_conversations, tmp_path, capsys):
    assert _build(toy_dataset, toy_conversations) == 2
    assert "exists" in capsys.readouterr().err
    assert _build(tmp_path / "nothing", tmp_path / "x") == 2
    assert "records.parquet: not found" in capsys.readouterr().err


@pytest.mark.parametrize("corrupt, message", [
    (lambda df: df.loc.__setitem__((5, "street"), " "), "record 5 (image_id='0-0-005'): field 'street' is empty"),
    (lambda df: df.loc.__setitem__((7, "image_id"), "0-0-000"), "record 7 (image_id='0-0-000'): field 'image_id' occurs"),
    (lambda df: df.loc.__setitem__((9, "utm_x"), float("nan")), "record 9 (image_id='0-0-009'): field 'utm_x' is not a number"),
    (lambda df: df.loc.__setitem__((3, "address_full"), "Elsewhere"), "record 3 (image_id='0-0-003'): field 'address_full'"),
])
def test_bad_dataset_rows_are_named(toy_dataset, tmp_path, capsys, corrupt, message):
    copy = tmp_path / "ds"
    shutil.copytree(toy_dataset, copy, ignore=shutil.ignore_patterns("images"))
    df = read_records(copy)
    corrupt(df)
    df.to_parquet(copy / "records.parquet", index=False)
    assert _build(copy, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(copy / "records.parquet") in err and message in err, err


def test_own_cross_streets_are_not_street_negatives():
    from clip_stage.core.schema import Address
    from conversations.build import BuildConfig, ConversationBuilder
    from conversations.neighbours import Neighbourhood

    a = Address("Main", "Main/0", ("Cross",), "Centre", "Town")
    cross = Address("Cross", "Cross/0", ("Main",), "Centre", "Town")
    far = Address("Far", "Far/0", (), "Centre", "Town")
    hood = Neighbourhood({x.sub_street: x for x in (a, cross, far)},
                         nearby={"Main/0": ("Cross/0", "Far/0"), "Cross/0": ("Main/0", "Far/0"), "Far/0": ("Main/0",)},
                         siblings={"Main/0": (), "Cross/0": (), "Far/0": ()})
    builder = ConversationBuilder(BuildConfig(dataset="d", out="o"), hood)
    assert builder.street_negatives(a) == [("Far", "Far/0")]
    assert builder.street_negatives(far) == [("Main", "Main/0")]
