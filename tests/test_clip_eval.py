"""eval-clip: galleries in every style and from files, metric definitions, cached embeddings, output files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clip_stage.evaluate import MAP_FILE, METRICS_FILE, PREDICTIONS_FILE, evaluate, format_table, main
from clip_stage.gallery import GalleryEncoder, gallery_from_dataset, gallery_from_file, model_fingerprint
from clip_stage.geo_metrics import candidate_geometries, score, sub_street_geometries_utm
from clip_stage.model import create_clip
from clip_stage.core.schema import ADDRESS_STYLES, read_records


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_bundle():
    torch.manual_seed(0)
    return create_clip("addressclip-tiny")


def _truth(df):
    return df[["image_id", "sub_street", "street", "neighbourhood", "utm_x", "utm_y"]].to_dict("records")


def test_gallery_styles_map_to_sub_streets(toy_dataset):
    sizes = {}
    for style in ADDRESS_STYLES:
        g = gallery_from_dataset(toy_dataset, style)
        sizes[style] = len(g)
        covered = set().union(*(c.sub_streets for c in g.candidates))
        assert len(covered) == 9  # every sub-street of the city is named by some candidate
        assert len(set(g.texts)) == len(g)
    assert sizes["full"] == 9 and sizes["sub_street"] == 9
    assert sizes["street"] == 3 and sizes["neighbourhood"] == 2
    street = gallery_from_dataset(toy_dataset, "street")
    esp = next(c for c in street.candidates if c.text == "Esplanadi")
    assert esp.sub_streets == {"Esplanadi/0", "Esplanadi/1", "Esplanadi/2"} and esp.streets == {"Esplanadi"}
    with pytest.raises(KeyError, match=r"unknown address style 'nope'; valid: \["):
        gallery_from_dataset(toy_dataset, "nope")


def test_candidate_file_plain_and_jsonl(toy_dataset, tmp_path):
    df = read_records(toy_dataset)
    full = df[df.sub_street == "Bulevardi/2"].address_full.iloc[0]
    f = tmp_path / "cands.txt"
    f.write_text(f"{full.upper()}\nEsplanadi\nNowhere Street 1\n\n"
                 + json.dumps({"address": "the long shopping street", "street": "Aleksanterinkatu"}) + "\n"
                 + json.dumps({"address": "the east end of Bulevardi", "sub_street": "Bulevardi/2"}) + "\n", encoding="utf-8")
    g = gallery_from_file(f, toy_dataset)
    by_text = {c.text: c for c in g.candidates}
    assert by_text[full.upper()].sub_streets == {"Bulevardi/2"}  # case-insensitive match on the full style
    assert by_text["Esplanadi"].sub_streets == {"Esplanadi/0", "Esplanadi/1", "Esplanadi/2"}
    assert by_text["Nowhere Street 1"].sub_streets == frozenset()
    assert len(by_text["the long shopping street"].sub_streets) == 3
    assert by_text["the east end of Bulevardi"].sub_streets == {"Bulevardi/2"}
    assert g.describe()["unmatched"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"address": "x", "sub_street": "Atlantis/0"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Atlantis/0"):
        gallery_from_file(bad, toy_dataset)


def test_metric_definitions_oracle_and_wrong(toy_dataset):
    df = read_records(toy_dataset, "test")
    geoms = sub_street_geometries_utm(toy_dataset)
    assert len(geoms) == 9
    full = gallery_from_dataset(toy_dataset, "full")
    idx = {next(iter(c.sub_streets)): i for i, c in enumerate(full.candidates)}
    cg = candidate_geometries(full, geoms)
    oracle = np.array([[idx[s]] + [j for j in range(9) if j != idx[s]][:4] for s in df.sub_street])
    _, m = score(_truth(df), oracle, full, cg)
    assert m["SSA-1"] == m["SA-1"] == m["neighbourhood-1"] == 1.0
    assert m["median_distance_m"] < 15  # images lie within a few metres of their sub-street's line

    # top-1 = the next sub-street along the same street; the right one second
    def neighbour(s):
        street, k = s.split("/")
        return f"{street}/{(int(k) + 1) % 3}"
    shifted = np.array([[idx[neighbour(s)], idx[s]] for s in df.sub_street])
    per, m = score(_truth(df), shifted, full, cg)
    assert m["SSA-1"] == 0.0 and m["SSA-5"] == 1.0 and m["SA-1"] == 1.0
    assert m["median_distance_m"] > 5  # off by one segment along the street
    assert all(r["ssa_rank"] == 1 and r["sa_rank"] == 0 for r in per)

    # street-only gallery: SA is meaningful, SSA cannot be scored (no candidate names one sub-street)
    street = gallery_from_dataset(toy_dataset, "street")
    sidx = {next(iter(c.streets)): i for i, c in enumerate(street.candidates)}
    right_street = np.array([[sidx[s]] for s in df.street])
    _, m = score(_truth(df), right_street, street, candidate_geometries(street, geoms))
    assert m["SA-1"] == 1.0 and m["SSA-1"] == 0.0
    assert m["median_distance_m"] < 15
    wrong_street = np.array([[sidx[{"Aleksanterinkatu": "Bulevardi"}.get(s, "Aleksanterinkatu")]] for s in df.street])
    _, m = score(_truth(df), wrong_street, street, candidate_geometries(street, geoms))
    assert m["SA-1"] == 0.0 and m["median_distance_m"] > 140  # streets are 150 m apart


def test_gallery_encoder_caches_in_memory_and_on_disk(tiny_bundle, tmp_path):
    texts = [f"Street {i}, Kluuvi, Helsinki" for i in range(70)]
    enc = GalleryEncoder(tmp_path, batch_size=16)
    a = enc(tiny_bundle.model, tiny_bundle.tokenizer, texts)
    assert a.shape == (70, 64) and torch.allclose(a.norm(dim=1), torch.ones(70), atol=1e-5)
    b = enc(tiny_bundle.model, tiny_bundle.tokenizer, texts)
    assert b is a and enc.stats == {"memory_hits": 1, "disk_hits": 0, "encoded": 1}
    assert len(list(tmp_path.glob("*.pt"))) == 1
    enc2 = GalleryEncoder(tmp_path, batch_size=64)
    c = enc2(tiny_bundle.model, tiny_bundle.tokenizer, texts)
    assert enc2.stats["disk_hits"] == 1 and torch.allclose(a, c, atol=1e-6)
    # batching does not change the embeddings: one batch of all texts gives the same result
    tokens = tiny_bundle.tokenizer(texts)
    with torch.no_grad():
        direct = tiny_bundle.model.encode_text(tokens, normalize=True)
    assert torch.allclose(a, direct, atol=1e-5)
    # other texts or other weights -> a new key, a fresh encoding
    enc2(tiny_bundle.model, tiny_bundle.tokenizer, texts[:-1])
    assert enc2.stats["encoded"] == 1
    before = model_fingerprint(tiny_bundle.model)
    with torch.no_grad():
        tiny_bundle.model.text_projection.add_(0.01)
    try:
        d = enc2(tiny_bundle.model, tiny_bundle.tokenizer, texts)
        assert model_fingerprint(tiny_bundle.model) != before
        assert enc2.stats["encoded"] == 2 and not torch.allclose(a, d)
    finally:
        with torch.no_grad():
            tiny_bundle.model.text_projection.sub_(0.01)


def test_eval_main_writes_consistent_outputs(toy_dataset, tmp_path):
    out = tmp_path / "eval"
    assert main(["--model", "addressclip-tiny", "--dataset", str(toy_dataset), "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--batch-size", "7"]) == 0
    m = json.loads((out / METRICS_FILE).read_text())
    preds = [json.loads(line) for line in (out / PREDICTIONS_FILE).read_text().splitlines()]
    test = read_records(toy_dataset, "test")
    assert len(preds) == m["num_images"] == len(test) and m["num_candidates"] == 9
    assert [p["image_id"] for p in preds] == test.image_id.tolist()
    for p in preds:
        scores = [t["score"] for t in p["top"]]
        assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    ssa1 = np.mean([p["top"][0]["sub_streets"] == [p["truth"]["sub_street"]] for p in preds])
    sa5 = np.mean([any(t["sub_streets"][0].split("/")[0] == p["truth"]["street"] for t in p["top"]) for p in preds])
    assert m["SSA-1"] == pytest.approx(ssa1) and m["SA-5"] == pytest.approx(sa5)
    assert m["median_distance_m"] == pytest.approx(np.median([p["distance_m"] for p in preds]))
    with Image.open(out / MAP_FILE) as im:
        assert im.size[0] > 400 and im.size[1] > 300
    assert "SSA-1" in format_table({"x": m})


def _colour_counts(path):
    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    red = ((px[:, 0] > 180) & (px[:, 1] < 90) & (px[:, 2] < 90)).sum()
    green = ((px[:, 1] > 130) & (px[:, 0] < 90) & (px[:, 2] < 90)).sum()
    return red, green


def test_map_colours_follow_correctness(toy_dataset, tmp_path):
    from clip_stage.plots import plot_prediction_map

    df = read_records(toy_dataset, "test")
    geoms = sub_street_geometries_utm(toy_dataset)
    pts = df[["utm_x", "utm_y"]].to_numpy()
    wrong_geom = [geoms["Bulevardi/0"]] * len(df)
    ok = plot_prediction_map(tmp_path / "ok.png", geoms, pts, np.ones(len(df), bool), wrong_geom)
    bad = plot_prediction_map(tmp_path / "bad.png", geoms, pts, np.zeros(len(df), bool), wrong_geom)
    (r_ok, g_ok), (r_bad, g_bad) = _colour_counts(ok), _colour_counts(bad)
    assert g_ok > 5 * g_bad and r_bad > 5 * r_ok  # legend markers aside, dots take the colour of the outcome


def test_eval_with_street_style_and_candidate_file(tiny_bundle, toy_dataset, tmp_path):
    g = gallery_from_dataset(toy_dataset, "street")
    m = evaluate(tiny_bundle, toy_dataset, tmp_path / "s", gallery=g, style="street", plot=False)
    assert m["primary_metric"] == "SA-1" and m["SSA-1"] == 0.0 and m["num_candidates"] == 3
    preds = [json.loads(line) for line in (tmp_path / "s" / PREDICTIONS_FILE).read_text().splitlines()]
    assert len(preds[0]["top"]) == 3 and preds[0]["truth"]["address"] == preds[0]["truth"]["street"]
    f = tmp_path / "c.txt"
    f.write_text("Esplanadi\nBulevardi\nAleksanterinkatu\nAtlantis Road\n", encoding="utf-8")
    m2 = evaluate(tiny_bundle, toy_dataset, None, gallery=gallery_from_file(f, toy_dataset))
    assert m2["num_candidates"] == 4 and m2["gallery"]["unmatched"] == 1
    assert m2["SA-1"] <= 1.0 and m2["num_without_distance"] >= 0


def _eval_error(capsys, argv, *needles):
    """eval-clip refuses argv: exit 2, ONE stderr line with a single prefix, naming each needle."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("eval-clip: error: ") and "Traceback" not in err, err
    assert lines[0].count("eval-clip:") == 1, err
    for n in needles:
        assert n in lines[0], (n, err)
    return lines[0]


@pytest.fixture
def small_run(tmp_path):
    """A train-clip run folder with final/ and one step folder (verified saves) of the tiny model."""
    from clip_stage.core.outdir import write_marker
    from clip_stage.model import save_checkpoint

    torch.manual_seed(0)
    model = create_clip("addressclip-tiny").model
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint-000001", model, "addressclip-tiny", None, step=1)
    save_checkpoint(run / "final", model, "addressclip-tiny", None)
    write_marker(run, "train-clip")
    return run


def test_eval_out_is_checked_before_the_model_loads(toy_dataset, small_run, tmp_path, capsys, monkeypatch):
    import clip_stage.evaluate as ev
    from clip_stage.model import load_checkpoint

    def must_not_load(*a, **k):
        raise AssertionError("the model loaded before --out was checked")

    monkeypatch.setattr(ev, "bundle_from_args", must_not_load)
    base = ["--checkpoint", str(small_run), "--dataset", str(toy_dataset), "--no-plot", "--out"]
    final = small_run / "final"
    before = {p: p.read_bytes() for p in final.iterdir()}
    _eval_error(capsys, [*base, str(final)], "is the input")
    _eval_error(capsys, [*base, str(final / "eval")], "inside the input")  # its manifest would list extra files
    _eval_error(capsys, [*base, str(small_run / "checkpoint-000001" / "eval")], "inside the input")
    _eval_error(capsys, ["--checkpoint", str(final), *base[2:], str(small_run / "checkpoint-000001" / "e")], "inside")
    _eval_error(capsys, [*base, str(toy_dataset)], "is the input")
    _eval_error(capsys, [*base, str(toy_dataset / "eval")], "inside the input")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("keep me")
    _eval_error(capsys, [*base, str(tmp_path / "mine")], "not a eval-clip output")
    (tmp_path / "afile.txt").write_text("x")
    _eval_error(capsys, [*base, str(tmp_path / "afile.txt")], "is a file")
    cands = tmp_path / "c.txt"
    cands.write_text("Esplanadi\n")
    _eval_error(capsys, [*base, str(tmp_path), "--candidates", str(cands)], "contains the input")
    assert {p: p.read_bytes() for p in final.iterdir()} == before and (tmp_path / "mine" / "thesis.txt").exists()
    monkeypatch.undo()
    load_checkpoint(small_run)  # still loads: nothing was written into it

    # The documented layout: an eval folder in the run folder, beside its checkpoints; a rerun replaces it whole.
    out = small_run / "eval"
    assert main([*base, str(out), "--limit", "10"]) == 0
    assert json.loads((out / ".address-llava.json").read_text())["kind"] == "eval-clip"
    (out / "stale.txt").write_text("from an earlier run")
    assert main([*base, str(out), "--limit", "5"]) == 0
    assert json.loads((out / METRICS_FILE).read_text())["num_images"] == 5 and not (out / "stale.txt").exists()
    assert not [p for p in small_run.iterdir() if p.name.startswith(".eval.")]  # no staging left behind
    load_checkpoint(small_run)


def test_eval_bad_inputs_are_one_line_errors_before_the_model_loads(toy_dataset, tmp_path, capsys, monkeypatch):
    import clip_stage.evaluate as ev

    def must_not_load(*a, **k):
        raise AssertionError("the model loaded before the inputs were checked")

    monkeypatch.setattr(ev, "bundle_from_args", must_not_load)
    base = ["--model", "addressclip-tiny", "--dataset", str(toy_dataset), "--no-plot", "--out", str(tmp_path / "o")]
    _eval_error(capsys, [*base, "--top-k", "0"], "--top-k must be >= 1")
    _eval_error(capsys, [*base, "--batch-size", "0"], "--batch-size")
    _eval_error(capsys, [*base, "--limit", "0"], "--limit")
    _eval_error(capsys, [*base, "--limit", "-3"], "--limit")  # not a silent subset
    line = _eval_error(capsys, ["--model", "nonexist", *base[2:]], "unknown CLIP architecture 'nonexist'")
    assert len(line) < 400  # not the list of every open_clip model
    _eval_error(capsys, [*base, "--pretrained", "bogus.pt"], "bogus.pt")
    for name, content in [("empty", b""), ("blank", b"  \n\n"), ("bad", b"{bad\n"), ("noaddr", b'{"street": "x"}\n'),
                          ("unknown", b'{"address": "a", "sub_street": "Atlantis/0"}\n'), ("binary", b"\xff\xfe\x00\x8a\x01")]:
        f = tmp_path / f"{name}.txt"
        f.write_bytes(content)
        _eval_error(capsys, [*base, "--candidates", str(f)], str(f))
    _eval_error(capsys, [*base, "--candidates", str(tmp_path / "missing.txt")], "missing.txt")
    assert not (tmp_path / "o").exists()


def test_eval_bad_pretrained_files_are_one_line_errors(toy_dataset, tmp_path, capsys):
    import argparse

    (tmp_path / "garbage.pt").write_text("not weights")
    torch.save({"a": torch.zeros(2)}, tmp_path / "wrong_keys.pt")
    torch.save({"state_dict": {"x": argparse.Namespace()}}, tmp_path / "pickle.pt")
    base = ["--model", "addressclip-tiny", "--dataset", str(toy_dataset), "--no-plot", "--out", str(tmp_path / "o")]
    _eval_error(capsys, [*base, "--pretrained", str(tmp_path / "garbage.pt")], "not a PyTorch")
    line = _eval_error(capsys, [*base, "--pretrained", str(tmp_path / "wrong_keys.pt")], "missing", "unexpected")
    assert len(line) < 400
    _eval_error(capsys, [*base, "--pretrained", str(tmp_path / "pickle.pt")], "refused")  # never unpickled
    assert not (tmp_path / "o").exists()


def test_eval_empty_split_is_refused(toy_dataset, tmp_path):
    import shutil

    from clip_stage.evaluate import EvalError, split_records

    ds = tmp_path / "ds"
    shutil.copytree(toy_dataset, ds)
    df = read_records(ds)
    df[df.split != "val"].to_parquet(ds / "records.parquet")
    with pytest.raises(EvalError, match="has no images"):
        split_records(ds, "val")
