"""Scoring answers against structured references: metrics, distances, unparseable and bad input."""

import json

import pytest

from clip_stage.core.schema import Address, read_records, render_address
from conversations.records import (CROSS_STREETS, FULL_ADDRESS, IMAGE_TOKEN, MULTIPLE_CHOICE, PLACE, STREET, YES_NO,
                                   RecordError, Reference)
from llava_address.eval import scoring
from llava_address.eval.embedder import clip_text_embedder
from llava_address.eval.parse import asks_yes_no, parse_mc, parse_yes_no
from llava_address.eval.scoring import AnswersError, Scorer

TYPES = [FULL_ADDRESS, STREET, CROSS_STREETS, PLACE, YES_NO, MULTIPLE_CHOICE]


def _eval_records(dataset):
    """An evaluation split like the conversation builder's: one question per test image, with a reference."""
    df = read_records(dataset, "test")
    subs = sorted(df["sub_street"].unique())
    out = []
    for i, row in df.iterrows():
        qtype = TYPES[i % len(TYPES)]
        ref = {"question_type": qtype, "street": row["street"], "sub_street": row["sub_street"],
               "cross_streets": list(row["cross_streets"]), "neighbourhood": row["neighbourhood"], "city": row["city"],
               "image_id": row["image_id"]}
        if qtype == YES_NO:
            ref["expected_answer"] = "yes" if i % 2 else "no"
        if qtype == MULTIPLE_CHOICE:
            others = [s for s in subs if s != row["sub_street"]][:3]
            ref["choices"] = [row["address_full"]] + [df[df["sub_street"] == s].iloc[0]["address_full"] for s in others]
            ref["expected_answer"] = "A"
        out.append({"id": f"{row['image_id']}-eval", "image": row["image"], "question_type": qtype,
                    "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhere is this?"},
                                      {"from": "gpt", "value": row["address_full"]}],
                    "reference": Reference(**ref).to_dict()})
    return out


def _perfect_answer(rec):
    ref, t = rec["reference"], rec["question_type"]
    a = Address(ref["street"], ref["sub_street"], tuple(ref["cross_streets"]), ref["neighbourhood"], ref["city"])
    return {
        "full_address": f"This photo was taken on {render_address(a, 'full')}.",
        "street": f"It's {ref['street']}.",
        "cross_streets": f"Between {' and '.join(ref['cross_streets'])}.",
        "place": f"{ref['neighbourhood']}, {ref['city']}",
        "yes_no": "Yes, it is." if ref["expected_answer"] == "yes" else "No, it is somewhere else.",
        "multiple_choice": "A. " + (ref["choices"] or [""])[0],
    }[t]


def _wrong_answer(rec, gaz):
    ref, t = rec["reference"], rec["question_type"]
    other = next(s for s in gaz.sub_streets.values() if s.street != ref["street"] and s.neighbourhood != ref["neighbourhood"])
    a = Address(other.street, other.id, other.cross_streets, other.neighbourhood, other.city)
    return {
        "full_address": render_address(a, "full"),
        "street": other.street,
        "cross_streets": f"between {other.cross_streets[0]} and Esplanadi",
        "place": other.neighbourhood,
        "yes_no": "No." if ref["expected_answer"] == "yes" else "Yes.",
        "multiple_choice": "(C)",
    }[t]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def scorer(toy_dataset):
    return Scorer.from_dataset(toy_dataset)


def test_perfect_answers_score_full_marks_with_small_distances(toy_dataset, scorer, tmp_path):
    recs = _eval_records(toy_dataset)
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps(recs), encoding="utf-8")
    ans = _write(tmp_path / "answers.jsonl", [{"id": r["id"], "question": "q", "answer": _perfect_answer(r),
                                               "reference": r["reference"]} for r in recs])
    report = scoring.score_files(toy_dataset, ans, ev, scorer=scorer)
    assert report.n_missing == 0 and not report.unparseable
    for name, m in report.metrics.items():
        assert m["total"] > 0, name
        assert m["correct"] == m["total"], (name, m)
    # The toy photos lie within ~12 m of their sub-street's centre line.
    assert report.distance["n"] == report.distance["total"] > 0
    assert report.distance["median_m"] < 15


def test_wrong_answers_score_zero_and_lie_far_away(toy_dataset, scorer):
    recs = _eval_records(toy_dataset)
    answers = [{"id": r["id"], "answer": _wrong_answer(r, scorer.gazetteer)} for r in recs]
    report = scorer.score(answers, scoring.eval_references(recs))
    for name, m in report.metrics.items():
        assert m["correct"] == 0, (name, m)
    assert report.distance["median_m"] > 100


def test_unparseable_answers_are_wrong_and_listed(toy_dataset, scorer):
    recs = _eval_records(toy_dataset)
    answers = [{"id": r["id"], "answer": "I cannot tell from this picture, sorry."} for r in recs]
    report = scorer.score(answers, scoring.eval_references(recs))
    assert len(report.unparseable) == len(recs)
    assert {u["id"] for u in report.unparseable} == {r["id"] for r in recs}
    assert all(m["correct"] == 0 for m in report.metrics.values())
    assert report.distance["n"] == 0 and report.distance["median_m"] is None


def test_partial_answers_count_missing_and_unknown_ids_fail(toy_dataset, scorer):
    recs = _eval_records(toy_dataset)
    refs = scoring.eval_references(recs)
    half = [{"id": r["id"], "answer": _perfect_answer(r)} for r in recs[: len(recs) // 2]]
    report = scorer.score(half, refs)
    assert report.n_answers == len(half) and report.n_missing == len(recs) - len(half)
    assert report.missing_ids == sorted(r["id"] for r in recs[len(half):])
    with pytest.raises(AnswersError, match="not in the evaluation split.*'nope'"):
        scorer.score(half + [{"id": "nope", "answer": "x"}], refs)
    with pytest.raises(AnswersError, match="answered twice"):
        scorer.score(half + half[:1], refs)


def test_strict_metrics_count_missing_and_error_rows_wrong(toy_dataset, scorer):
    recs = _eval_records(toy_dataset)
    for i, r in enumerate(recs):
        r["reference"]["phrasing"] = ("seen", "held_out")[i % 2]
    refs = scoring.eval_references(recs)
    half = len(recs) // 2
    rows = [{"id": r["id"], "answer": _perfect_answer(r)} for r in recs[:half]]
    rows.append({"id": recs[half]["id"], "error": "image unreadable"})  # an error row; the rest are missing
    report = scorer.score(rows, refs)
    assert all(m["correct"] == m["total"] for m in report.metrics.values() if m["total"])  # over the answered
    strict = report.strict_metrics
    assert sum(m["total"] for m in strict.values()) > sum(m["total"] for m in report.metrics.values())
    for name, m in strict.items():
        assert m["correct"] == report.metrics[name]["correct"]  # the unanswered add to the totals only
        if m["total"] > report.metrics[name]["total"]:
            assert m["value"] < 1.0
    assert "unanswered counted wrong" in report.markdown()
    # per wording too: each wording's strict totals are those of the whole split, its correct ones the answered
    everything = scorer.score([{"id": r["id"], "answer": _perfect_answer(r)} for r in recs], refs).by_phrasing
    assert set(report.strict_by_phrasing) == set(everything) == {"held_out", "seen"}
    for g, by_metric in report.strict_by_phrasing.items():
        for name, m in by_metric.items():
            assert m["total"] == everything[g][name]["total"]
            assert m["correct"] == report.by_phrasing.get(g, {}).get(name, {}).get("correct", 0)
    # every question answered: strict and plain agree; without the split there is no strict table
    full = scorer.score([{"id": r["id"], "answer": _perfect_answer(r)} for r in recs], refs)
    assert full.strict_metrics == full.metrics and full.strict_by_phrasing == full.by_phrasing
    own = scorer.score([{"id": r["id"], "answer": _perfect_answer(r), "reference": r["reference"]} for r in recs[:3]])
    assert own.strict_metrics == {}


def test_answers_without_eval_split_use_their_own_references(toy_dataset, scorer, tmp_path):
    recs = _eval_records(toy_dataset)[:6]
    rows = [{"id": r["id"], "answer": _perfect_answer(r), "reference": r["reference"]} for r in recs]
    report = scorer.score(rows)
    assert report.n_eval == 6 and sum(report.by_type.values()) == 6
    assert all(m["correct"] == m["total"] for m in report.metrics.values())
    with pytest.raises(AnswersError, match="no reference"):
        scorer.score([{"id": "x", "answer": "y"}])
    bad = _write(tmp_path / "bad.jsonl", [{"id": "x", "answer": "y"}])
    bad.write_text(bad.read_text() + "{not json\n", encoding="utf-8")
    with pytest.raises(AnswersError, match=r"bad.jsonl: line 2: invalid JSON"):
        scoring.read_answers(bad)


def test_a_reference_off_the_contract_is_an_error_not_a_guess(scorer):
    """The alias tables are gone: another writer's key or type name is refused, naming the answer."""
    for ref, message in (({"question_type": "yesno", "expected_answer": "yes"}, "unknown question type 'yesno'"),
                         ({"question_type": "yes_no", "expected": True}, r"unknown key\(s\) \['expected'\]"),
                         ({"street": "Esplanadi"}, "no question_type")):
        with pytest.raises(RecordError, match=rf"^answers: id a: reference.*{message}"):
            scorer.score([{"id": "a", "answer": "Yes.", "reference": ref}])


def test_sub_street_needs_the_right_cross_streets(scorer):
    ref = {"street": "Esplanadi", "sub_street": "Esplanadi/1", "cross_streets": ["Kaivokatu", "Fredrikinkatu"],
           "neighbourhood": "Kamppi", "city": "Helsinki", "question_type": FULL_ADDRESS}
    refs = scoring.eval_references([{"id": k, "reference": ref} for k in "abc"])
    report = scorer.score([{"id": "a", "answer": "Esplanaden mellan Kaivogatan och Fredriksgatan"},
                           {"id": "b", "answer": "Esplanadi between Mikonkatu and Kaivokatu, Kamppi"},
                           {"id": "c", "answer": "The Esplanade"}], refs)
    details = {d.id: d for d in report.details}
    assert details["a"].correct == {"street_acc": True, "sub_street_acc": True, "neighbourhood_acc": False}
    assert details["b"].correct["street_acc"] and not details["b"].correct["sub_street_acc"]
    assert details["c"].parsed["sub_street"] is None and details["c"].distance_m is not None


def test_asks_yes_no_tells_verification_questions_from_every_other_wording():
    from conversations.templates import QUESTION_TYPES

    for qtype in QUESTION_TYPES.values():  # every training and held-out wording of every question type
        for wording in qtype.questions + qtype.held_out:
            question = wording.format(candidate="Bulevardi", choices="A. Bulevardi\nB. Esplanadi")
            assert asks_yes_no(question) is (qtype.name == YES_NO), question
    prompt = f"{IMAGE_TOKEN}\nCandidate addresses (AddressCLIP top-5):\n1. Esplanadi\nIsn't this Bulevardi?"
    assert asks_yes_no(prompt)  # the candidate block above the question is skipped
    for free_form in ("What is near Bulevardi?", "Can you tell me what is on Bulevardi?", "Name a cafe on Bulevardi.",
                      "Which one is correct?", ""):
        assert not asks_yes_no(free_form), free_form


@pytest.mark.parametrize("text, expected", [
    ("Yes, this is Esplanadi.", True), ("No.", False), ("It isn't on that street.", False),
    ("Correct!", True), ("Ei, se on Bulevardi.", False), ("Maybe Esplanadi.", None)])
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) is expected


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("(C) Esplanadi", "C"), ("The answer is D.", "D"), ("A. Bulevardi", "A"),
    ("A street in Kamppi, option b", "B"), ("Esplanadi between Kaivokatu and Fredrikinkatu", "B"),
    ("No idea", None)])
def test_parse_mc(scorer, text, expected):
    options = ["Bulevardi between Mikonkatu and Kaivokatu", "Esplanadi between Kaivokatu and Fredrikinkatu",
               "Aleksanterinkatu near Annankatu", "Bulevardi near Annankatu"]
    assert parse_mc(text, options, scorer.gazetteer) == expected


def test_embedding_fallback_parses_what_the_gazetteer_cannot(toy_dataset):
    from tests.test_eval_gazetteer import _trigram_embed

    ref = {"street": "Bulevardi", "sub_street": "Bulevardi/2", "cross_streets": ["Fredrikinkatu", "Annankatu"],
           "neighbourhood": "Kamppi", "city": "Helsinki", "question_type": FULL_ADDRESS}
    # Misspelt beyond the fuzzy threshold everywhere, but close in the (stand-in) embedding space.
    answer = "Bulevardy betwen Fredrikinkadu and Annankadu, Kamppi district"
    plain = Scorer.from_dataset(toy_dataset, threshold=99).score([{"id": "a", "answer": answer, "reference": ref}])
    assert plain.details[0].unparseable and plain.details[0].correct["neighbourhood_acc"]
    emb = Scorer.from_dataset(toy_dataset, threshold=99, embed=_trigram_embed, min_similarity=0.3)
    d = emb.score([{"id": "a", "answer": answer, "reference": ref}]).details[0]
    assert d.parsed["method"] == "embedding" and d.correct["sub_street_acc"] and d.correct["neighbourhood_acc"]


def test_score_cli_writes_report(toy_dataset, tmp_path, capsys):
    recs = _eval_records(toy_dataset)
    ev = tmp_path / "eval.jsonl"
    _write(ev, recs)
    ans = _write(tmp_path / "answers.jsonl", [{"id": r["id"], "question": "q", "answer": _perfect_answer(r)}
                                              for r in recs[:-3]] + [{"id": recs[-1]["id"], "answer": "dunno"}])
    aliases = tmp_path / "aliases.json"
    aliases.write_text(json.dumps({"Kampen": "Kamppi"}), encoding="utf-8")
    assert scoring.main(["--dataset", str(toy_dataset), "--answers", str(ans), "--eval", str(ev), "--aliases",
                         str(aliases), "--out", str(tmp_path / "r.json"), "--details", str(tmp_path / "d.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "street_acc" in out and "unparseable (1)" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_missing"] == 2 and report["unparseable"][0]["id"] == recs[-1]["id"]
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == len(recs) - 2


@pytest.fixture(scope="module")
def built_eval(toy_conversations):
    """The conversation builder's own evaluation split of the toy dataset (conftest)."""
    return toy_conversations / "eval.json"


def test_the_builders_reference_answers_score_full_marks(toy_dataset, scorer, built_eval):
    recs = json.loads(built_eval.read_text())
    refs = scoring.eval_references(recs)
    right = scorer.score([{"id": r["id"], "answer": r["conversations"][1]["value"]} for r in recs], refs)
    scored = [m for m in right.metrics.values() if m["total"]]
    assert len(scored) >= 5 and all(m["correct"] == m["total"] for m in scored)
    assert not right.unparseable
    # Metrics are also split by question wording (seen in training / held out), summing to the whole.
    phrasings = {r["reference"]["phrasing"] for r in recs}
    assert set(right.by_phrasing) == phrasings
    for m, v in right.metrics.items():
        assert sum(right.by_phrasing[g][m]["total"] for g in phrasings) == v["total"]
    assert "phrasing" in right.markdown()
    # Each answer given to a record a third of the split away (another street: the split is sorted by street).
    k = len(recs) // 3
    shifted = scorer.score([{"id": r["id"], "answer": recs[(i + k) % len(recs)]["conversations"][1]["value"]}
                            for i, r in enumerate(recs)], refs)
    assert shifted.metrics["street_acc"]["correct"] == 0 and shifted.metrics["sub_street_acc"]["correct"] == 0
    assert sum(m["correct"] for m in shifted.metrics.values()) < sum(m["correct"] for m in right.metrics.values()) / 2


def test_addressclip_text_embedder_from_a_train_clip_checkpoint_and_its_export(toy_dataset, tmp_path):
    import numpy as np
    import torch

    from clip_stage.export_hf import export_open_clip
    from clip_stage.model import create_clip, save_checkpoint

    torch.manual_seed(0)
    bundle = create_clip("addressclip-tiny")
    ckpt = save_checkpoint(tmp_path / "clip", bundle.model, "addressclip-tiny", None)
    texts = ["Bulevardi between Fredrikinkatu and Annankatu, Kamppi, Helsinki", "Esplanadi", "Kluuvi"]
    embed = clip_text_embedder(ckpt)
    e = embed(texts)
    assert e.shape[0] == 3 and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    export_open_clip(bundle.model, bundle.tokenizer, tmp_path / "export")
    e_hf = clip_text_embedder(tmp_path / "export")(texts)
    assert np.allclose(e, e_hf, atol=1e-4)  # the same text tower through transformers
    with pytest.raises(Exception, match="clip-nowhere"):
        clip_text_embedder(tmp_path / "clip-nowhere")
    # The scorer uses it for answers in which the gazetteer finds no street.
    s = Scorer.from_dataset(toy_dataset, embed=embed, min_similarity=-1.0)
    d = s.score([{"id": "a", "answer": "somewhere unknown", "reference": {
        "street": "Bulevardi", "sub_street": "Bulevardi/2", "cross_streets": ["Fredrikinkatu", "Annankatu"],
        "neighbourhood": "Kamppi", "city": "Helsinki", "question_type": FULL_ADDRESS}}]).details[0]
    assert d.parsed["method"] == "embedding" and d.parsed["sub_street"] in s.gazetteer.sub_streets


def _exit_code(main, argv) -> int:
    """A command's exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_score_cli_never_writes_over_its_inputs_and_checks_options_first(toy_dataset, tmp_path, capsys):
    recs = _eval_records(toy_dataset)
    ev = _write(tmp_path / "eval.jsonl", recs)
    ans = _write(tmp_path / "answers.jsonl", [{"id": r["id"], "answer": _perfect_answer(r)} for r in recs])
    before = {p: p.read_bytes() for p in (ev, ans, toy_dataset / "records.parquet")}
    base = ["--dataset", str(toy_dataset), "--answers", str(ans), "--eval", str(ev)]
    for extra, message in ((["--out", str(ans)], "is the input"),
                           (["--details", str(ev)], "is the input"),
                           (["--out", str(toy_dataset / "records.parquet")], "lies inside the input"),
                           (["--out", str(tmp_path / "r.json"), "--details", str(tmp_path / "r.json")], "also --out"),
                           (["--out", str(tmp_path)], "is a folder"),
                           (["--threshold", "150"], "between 0 and 100")):
        assert _exit_code(scoring.main, base + extra) == 2
        assert message in capsys.readouterr().err
    assert all(p.read_bytes() == data for p, data in before.items())


def test_score_keeps_going_past_bad_rows_and_reports_them(toy_dataset, tmp_path, capsys):
    recs = _eval_records(toy_dataset)
    ev = _write(tmp_path / "eval.jsonl", recs)
    good = [{"id": r["id"], "answer": _perfect_answer(r)} for r in recs[2:]]
    ans = tmp_path / "answers.jsonl"
    ans.write_text("{not json\n" + json.dumps({"id": recs[1]["id"]}) + "\n" + json.dumps(["a list"]) + "\n"
                   + "".join(json.dumps(g) + "\n" for g in good) + json.dumps(good[0]) + "\n"
                   + json.dumps({"id": "nope", "answer": "x"}) + "\n", encoding="utf-8")
    out = tmp_path / "r.json"
    assert scoring.main(["--dataset", str(toy_dataset), "--answers", str(ans), "--eval", str(ev), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "line 1: invalid JSON" in err and "line 2: lacks 'id' or 'answer'" in err and "line 3: not a JSON object" in err
    assert "answered twice" in err and "'nope' is not in the evaluation split" in err
    report = json.loads(out.read_text())
    assert len(report["bad_rows"]) == 5 and report["n_answers"] == len(good)
    assert report["n_missing"] == 2  # the two questions whose rows were bad
    assert all(m["correct"] == m["total"] for m in report["metrics"].values())
    junk = tmp_path / "junk.jsonl"
    junk.write_text("{not json\n[1]\n", encoding="utf-8")
    assert _exit_code(scoring.main, ["--dataset", str(toy_dataset), "--answers", str(junk), "--eval", str(ev)]) == 2
    assert "no row could be scored" in capsys.readouterr().err
