"""Candidate-grounded answers: cross-fitted AddressCLIP candidates, their one prompt format, the conversation
builder writing them, and the inference paths (infer, chat, benchmark) writing the same block."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clip_stage.candidates import AddressRanker, cross_fit_candidates, read_candidates
from clip_stage.train_data import drop_fold, fold_of, parse_fold
from clip_stage.gallery import gallery_from_dataset
from clip_stage.core.schema import read_records
from conversations.candidates import NONE_FITS, candidate_block, split_candidates, with_candidates

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_folds_are_a_stable_partition_and_the_holdout_is_dropped():
    ids = [f"img{i}" for i in range(300)]
    folds = fold_of(ids, 3)
    assert set(folds.tolist()) == {1, 2, 3} and (fold_of(ids, 3) == folds).all()
    assert all(60 < (folds == k).sum() < 140 for k in (1, 2, 3))
    import pandas as pd

    df = pd.DataFrame({"image_id": ids})
    kept = drop_fold(df, "2/3")
    assert set(kept["image_id"]) == {i for i, f in zip(ids, folds) if f != 2}
    assert len(drop_fold(df, "")) == 300
    for bad in ("0/3", "4/3", "1/1", "x", "1-3"):
        with pytest.raises(ValueError):
            parse_fold(bad)


def test_candidate_block_round_trips_and_keeps_the_question_last():
    cands = [{"address": "A Street between B and C", "probability": 0.61}, {"address": "D Road", "probability": 0.2}]
    text = with_candidates("Where was this photo taken?", cands, scores=True)
    assert text.splitlines()[0] == "Candidate addresses (AddressCLIP top-2):"
    assert "1. A Street between B and C (p=0.61)" in text and text.endswith("Where was this photo taken?")
    assert split_candidates("<image>\n" + text) == (["A Street between B and C", "D Road"], "Where was this photo taken?")
    assert split_candidates("Where?") == ([], "Where?")
    assert candidate_block([]) == "" and with_candidates("Q?", []) == "Q?"


@pytest.fixture(scope="module")
def clip_run(toy_dataset, tmp_path_factory):
    """A tiny AddressCLIP trained on the toy city (records its train-clip config, as every train-clip run)."""
    from clip_stage.train import main

    out = tmp_path_factory.mktemp("clip") / "run"
    assert main(["--dataset", str(toy_dataset), "--model", "addressclip-tiny", "--pretrained", "none",
                 "--output-dir", str(out), "--num-workers", "0", "--progress-bar", "false", "--learning-rate", "1e-3",
                 "--min-lr", "1e-5", "--per-device-batch-size", "16", "--num-epochs", "2", "--report-to", "none"]) == 0
    return out


@pytest.fixture(scope="module")
def cross_fitted(clip_run, toy_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cands") / "candidates"
    info = cross_fit_candidates(clip_run, toy_dataset, out, folds=2, top_k=3)
    return out, info


def test_cross_fitting_ranks_each_training_image_with_a_model_that_never_saw_it(cross_fitted, toy_dataset):
    out, info = cross_fitted
    rows = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    records = read_records(toy_dataset)
    assert len(rows) == len(records) == info["images"]
    train_ids = records.loc[records["split"] == "train", "image_id"].astype(str).tolist()
    folds = dict(zip(train_ids, fold_of(train_ids, 2)))
    for r in rows:
        assert len(r["candidates"]) == 3
        if r["split"] == "train":  # ranked by the model of the fold that held this image out
            assert r["source"] == f"fold-{folds[r['image_id']]}/2"
        else:
            assert r["source"] == "full"
    # the fold models really trained without their fold: their recorded config says so
    from clip_stage.model import read_checkpoint_config

    for k in (1, 2):
        recorded = read_checkpoint_config(out / f"fold-{k}" / "final")["train_config"]
        assert recorded["data"]["holdout_fold"] == f"{k}/2"
    # candidates come from the gallery, never from the label: a list may miss the truth
    gallery = set(gallery_from_dataset(toy_dataset).texts)
    assert all(c["address"] in gallery for r in rows for c in r["candidates"])
    assert "train (cross-fitted)" in info["accuracy"] and "test (full model)" in info["accuracy"]
    assert read_candidates(out).keys() == {r["image_id"] for r in rows}


def test_a_rerun_reuses_the_fold_models_and_clears_a_killed_write(cross_fitted, clip_run, toy_dataset):
    out, info = cross_fitted
    stamp = (out / "fold-1" / "final" / "model.safetensors").stat().st_mtime_ns
    killed = out / ".candidates.jsonl.99999.tmp"  # what a kill during the last write leaves
    killed.write_text('{"partial')
    again = cross_fit_candidates(clip_run, toy_dataset, out, folds=2, top_k=3)
    assert (out / "fold-1" / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    assert again["accuracy"] == info["accuracy"]
    assert not killed.exists()


def test_conversations_write_candidates_and_say_none_fits_only_when_the_truth_is_missing(cross_fitted, toy_dataset,
                                                                                         tmp_path):
    from conversations.build import main

    cands_dir, _ = cross_fitted
    out = tmp_path / "conv"
    assert main(["--dataset", str(toy_dataset), "--out", str(out), "--candidates", str(cands_dir),
                 "--candidate-fraction", "0.5", "--candidate-k", "2"]) == 0
    train = json.loads((out / "train.json").read_text())
    cands = read_candidates(cands_dir)
    records = read_records(toy_dataset).set_index("image_id")
    gallery = gallery_from_dataset(toy_dataset)
    subs_of = {c.text: c.sub_streets for c in gallery.candidates}
    with_c = [r for r in train if "candidates" in r]
    assert 0.25 * len(train) < len(with_c) < 0.75 * len(train)
    checked_missing = checked_present = 0
    for r in with_c:
        listed, question = split_candidates(r["conversations"][0]["value"])
        assert listed == r["candidates"] == [c["address"] for c in cands[r["id"]][:2]]  # exactly the file's top-2
        assert not question.startswith("Candidate")
        truth = records.loc[r["id"], "sub_street"]
        present = any(truth in subs_of[a] for a in listed)
        for t, ans in zip(r["turn_types"], r["conversations"][1::2]):
            if t in ("full_address", "cross_streets"):
                assert ans["value"].startswith(NONE_FITS) == (not present)
                checked_missing += not present
                checked_present += present
    assert checked_present > 0
    for r in train:
        if "candidates" not in r:
            assert not r["conversations"][0]["value"].replace("<image>\n", "").startswith("Candidate")
            assert not any(t["value"].startswith(NONE_FITS) for t in r["conversations"][1::2])
    info = json.loads((out / "build_info.json").read_text())
    assert info["train"]["with_candidates"] == len(with_c)


def test_ranker_top_k_is_sorted_and_batched_like_single(clip_run, toy_dataset):
    from PIL import Image

    ranker = AddressRanker.from_checkpoint(clip_run, toy_dataset)
    records = read_records(toy_dataset, "test").head(3)
    images = [Image.open(Path(toy_dataset) / "images" / p).convert("RGB") for p in records["image"]]
    batch = ranker.top_k_batch(images, 4)
    for im, top in zip(images, batch):
        sims = [c["similarity"] for c in top]
        assert sims == sorted(sims, reverse=True) and len(top) == 4
        assert [c["address"] for c in ranker.top_k(im, 4)] == [c["address"] for c in top]


class _FakeRanker:
    def __init__(self):
        self.calls = 0

    def top_k_batch(self, images, k):
        self.calls += 1
        return [[{"address": f"Street {i}", "probability": 0.5} for i in range(k)] for _ in images]

    def top_k(self, image, k):
        return self.top_k_batch([image], k)[0]


def test_inference_writes_the_training_block_before_each_question():
    from llava_address.eval.infer import candidate_answer_batch

    seen = []

    def answer_batch(questions, images):
        seen.extend(questions)
        return ["ok"] * len(questions)

    ranker = _FakeRanker()
    wrapped = candidate_answer_batch(answer_batch, ranker, top_k=3)
    assert wrapped(["Where?", "Which street?"], [object(), object()]) == ["ok", "ok"]
    assert ranker.calls == 1  # one ranking call per batch
    assert seen[0] == with_candidates("Where?", [f"Street {i}" for i in range(3)])
    assert split_candidates(seen[1]) == (["Street 0", "Street 1", "Street 2"], "Which street?")


def test_chat_puts_candidates_in_the_first_turn_only():
    from llava_address.apps.chat import conversation, resolve_candidates

    msgs = conversation("And the neighbourhood?", [("Where?", "On X.")], ["X", "Y"])
    assert msgs[0]["value"] == "<image>\n" + with_candidates("Where?", ["X", "Y"])
    assert msgs[2]["value"] == "And the neighbourhood?"
    first = conversation("Where?", (), ["X"])
    assert first[0]["value"].startswith("<image>\nCandidate addresses (AddressCLIP top-1):")
    assert conversation("Where?")[0]["value"] == "<image>\nWhere?"
    assert resolve_candidates(_FakeRanker(), object(), 2)[1]["address"] == "Street 1"
    assert resolve_candidates(None, object()) is None


def test_benchmark_llava_systems_accept_candidate_options(tmp_path):
    from llava_address.eval.benchmark import BenchmarkError, check_system_spec, parse_system_spec

    model, clip = tmp_path / "merged", tmp_path / "clip"
    model.mkdir()
    (model / "config.json").write_text("{}")
    clip.mkdir()
    spec = parse_system_spec(f"ours_candidates=llava:{model},candidates={clip},top_k=5,candidate_scores=true")
    assert spec.options == {"candidates": str(clip), "top_k": "5", "candidate_scores": "true"}
    check_system_spec(spec)
    with pytest.raises(BenchmarkError):
        check_system_spec(parse_system_spec(f"x=llava:{model},cands={clip}"))


def test_candidates_command_errors_are_one_line(tmp_path, capsys, toy_dataset):
    from clip_stage.candidates import main

    assert main(["--checkpoint", str(tmp_path / "nope"), "--dataset", str(toy_dataset), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("candidates: error: ") and "nope" in err and "\n" not in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("user data")
    assert main(["--checkpoint", str(tmp_path), "--dataset", str(toy_dataset), "--out", str(tmp_path / "busy")]) == 2
    assert (tmp_path / "busy" / "mine.txt").read_text() == "user data"


@pytest.mark.parametrize("option, message", [
    (("--splits", "bogus"), "unknown split"),
    (("--splits", ""), "no split given"),
    (("--splits", "val,tset"), "'tset'"),
    (("--style", "bogus"), "unknown address style"),
])
def test_candidates_bad_options_are_refused_before_any_fold_trains(option, message, clip_run, toy_dataset, tmp_path,
                                                                   capsys):
    from clip_stage.candidates import CandidatesError, main

    argv = ["--checkpoint", str(clip_run), "--dataset", str(toy_dataset), "--out", str(tmp_path / "o"), *option]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("candidates: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()  # nothing trained, nothing written
    with pytest.raises(CandidatesError, match=message):  # --debug: the traceback, from the command guard
        main([*argv, "--debug"])


def _other_run(toy_dataset, out, *extra):
    from clip_stage.train import main

    assert main(["--dataset", str(toy_dataset), "--model", "addressclip-tiny", "--pretrained", "none",
                 "--output-dir", str(out), "--num-workers", "0", "--progress-bar", "false", "--learning-rate", "1e-3",
                 "--min-lr", "1e-5", "--per-device-batch-size", "16", "--num-epochs", "2", "--report-to", "none",
                 *extra]) == 0
    return out


def test_a_rerun_with_other_settings_refuses_the_fold_models_and_deletes_nothing(cross_fitted, clip_run, toy_dataset,
                                                                                 tmp_path, capsys):
    from clip_stage.candidates import FOLDS_FILE, main

    out, _ = cross_fitted
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    other_seed = _other_run(toy_dataset, tmp_path / "seed9", "--seed", "9")
    moved = shutil.copytree(toy_dataset, tmp_path / "moved")
    cases = [
        (["--checkpoint", str(other_seed), "--dataset", str(toy_dataset)], "optim.seed"),
        (["--checkpoint", str(clip_run), "--dataset", str(moved)], "data.dataset"),
        (["--checkpoint", str(clip_run), "--dataset", str(toy_dataset), "--folds", "3"], "data.holdout_fold"),
    ]
    for argv, field in cases:
        assert main([*argv, "--out", str(out), "--top-k", "3"]) == 2, field
        err = capsys.readouterr().err.strip()
        assert err.startswith("candidates: error: ") and field in err and "nothing was deleted" in err, err
    # the same path holding another dataset (rebuilt with another split seed): its records' sha256 differs
    copy = shutil.copytree(out, tmp_path / "copy")
    folds = json.loads((copy / FOLDS_FILE).read_text())
    folds["fold-2"]["records_sha256"] = "0" * 64
    (copy / FOLDS_FILE).write_text(json.dumps(folds))
    assert main(["--checkpoint", str(clip_run), "--dataset", str(toy_dataset), "--out", str(copy)]) == 2
    assert "dataset records (sha256)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp  # untouched, nothing trained


def test_chat_session_writes_candidate_scores_when_asked(monkeypatch):
    """chat --candidate-scores: the block carries each candidate's probability, as infer --candidate-scores."""
    from llava_address.apps import chat

    seen = {}
    monkeypatch.setattr(chat, "fit_history", lambda gen, q, history, *rest: history)
    monkeypatch.setattr(chat, "answer", lambda image, q, history, **kw: seen.update(kw) or "ok")
    session = chat.ChatSession(object(), object(), ranker=_FakeRanker(), top_k=2, candidate_scores=True)
    assert session.ask("Where?") == "ok"
    assert seen["candidate_scores"] is True and len(seen["candidates"]) == 2
    block = chat.conversation("Where?", (), seen["candidates"], seen["candidate_scores"])[0]["value"]
    assert "1. Street 0 (p=0.50)" in block
    assert chat.build_parser().parse_args(["--image", "x", "--candidate-scores"]).candidate_scores


def test_conversations_refuse_candidates_ranked_for_another_dataset(cross_fitted, toy_dataset, tmp_path, capsys):
    from clip_stage.core.schema import DatasetPaths, write_records
    from conversations.build import main

    cands_dir, _ = cross_fitted
    other = tmp_path / "other"  # the same image ids, other splits: a fold model may have trained on an image
    shutil.copytree(toy_dataset, other, symlinks=True)
    records = read_records(other)
    records["split"] = records["split"].sample(frac=1.0, random_state=0).to_numpy()
    assert (records["split"] != read_records(toy_dataset)["split"]).any()
    write_records(records, DatasetPaths(other).records)
    argv = ["--dataset", str(other), "--candidates", str(cands_dir)]
    assert main([*argv, "--out", str(tmp_path / "c1")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("conversations: error: ") and "ranked for another dataset" in err
    assert not (tmp_path / "c1").exists()

    old = tmp_path / "old_cands"  # a candidates folder from before the fingerprint: checked by the splits
    shutil.copytree(cands_dir, old)
    info = json.loads((old / "candidates_info.json").read_text())
    del info["records_fingerprint"]
    (old / "candidates_info.json").write_text(json.dumps(info))
    assert main(["--dataset", str(other), "--candidates", str(old), "--out", str(tmp_path / "c2")]) == 2
    assert "ranked for another dataset" in capsys.readouterr().err

    captioned = tmp_path / "captioned"  # new captions only: the same images, splits and labels
    shutil.copytree(toy_dataset, captioned, symlinks=True)
    records = read_records(captioned)
    records["caption"] = "a new caption"
    write_records(records, DatasetPaths(captioned).records)
    assert main(["--dataset", str(captioned), "--candidates", str(cands_dir), "--out", str(tmp_path / "c3")]) == 0
