"""query-map: which area a query names, the AUC of the activation against it, the maps and report, bad inputs,
and the web demo's "address query" box."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from clip_stage.query_map import (JSON_FILE, SINGLE_PNG, AddressIndex, QueryMapConfig, QueryMapper, main, png_names,
                                  roc_auc)
from clip_stage.core.schema import read_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained_clip(toy_dataset, tmp_path_factory):
    """addressclip-tiny fine-tuned on the toy city for 6 epochs (a few seconds): it tells the streets apart."""
    from clip_stage.train import main as train_main

    out = tmp_path_factory.mktemp("qmap") / "run"
    assert train_main(["--dataset", str(toy_dataset), "--model", "addressclip-tiny", "--pretrained", "none",
                       "--output-dir", str(out), "--num-workers", "0", "--progress-bar", "false", "--learning-rate", "1e-3",
                       "--min-lr", "1e-5", "--per-device-batch-size", "16", "--num-epochs", "6", "--save-every", "1000",
                       "--report-to", "none"]) == 0
    return out


def _subs(df, **where) -> set[str]:
    mask = np.ones(len(df), bool)
    for col, value in where.items():
        mask &= (df[col] == value).to_numpy()
    return set(df.loc[mask, "sub_street"])


def test_roc_auc_known_values_and_ties():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0 and roc_auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert roc_auc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5
    assert roc_auc([1, 2], [1, 1]) is None and roc_auc([1, 2], [0, 0]) is None
    rng = np.random.default_rng(0)  # many ties: every (inside, outside) pair counted by hand
    s, y = rng.integers(0, 5, 200), rng.random(200) < 0.3
    pairs = (s[y][:, None] > s[~y][None, :]).mean() + 0.5 * (s[y][:, None] == s[~y][None, :]).mean()
    assert roc_auc(s, y) == pytest.approx(pairs)


def test_address_index_finds_the_named_area(toy_dataset):
    df = read_records(toy_dataset)
    index = AddressIndex.from_dataset(toy_dataset)
    street = index.match("Aleksanterinkatu")
    assert (street.level, street.method) == ("street", "exact")
    assert street.sub_streets == _subs(df, street="Aleksanterinkatu") and len(street.sub_streets) == 3
    hood = index.match("  kamppi,   HELSINKI ")
    assert hood.level == "neighbourhood" and hood.sub_streets == _subs(df, neighbourhood="Kamppi")
    assert index.match("Kluuvi").sub_streets == _subs(df, neighbourhood="Kluuvi")
    sub = index.match("Esplanadi between Kaivokatu and Fredrikinkatu")
    assert sub.level == "sub_street" and sub.sub_streets == {"Esplanadi/1"}
    row = df.iloc[-1]  # every stored style of a record names its sub-street
    assert index.match(row["address_canonical"]).sub_streets == {row["sub_street"]}
    assert index.match(row["address_full"]).sub_streets == {row["sub_street"]}
    # free wording: a street inside a neighbourhood is their intersection; a misspelling is fuzzy
    free = index.match("red buildings on Bulevardi in Kluuvi")
    assert free.method == "contains" and free.level == "street"
    assert free.sub_streets == _subs(df, street="Bulevardi", neighbourhood="Kluuvi") and free.sub_streets
    typo = index.match("Aleksanterinktau")
    assert typo.method == "fuzzy" and typo.sub_streets == street.sub_streets
    nothing = index.match("a lovely beach at sunset")
    assert (nothing.level, nothing.method, nothing.sub_streets) == (None, "none", frozenset())


def _reddish(path) -> int:
    """Pixels of the area outline (red, drawn half-transparent) - no viridis colour is near it."""
    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB")).astype(int).reshape(-1, 3)
    return int(((px[:, 0] > 200) & (px[:, 0] - px[:, 1] > 60) & (px[:, 0] - px[:, 2] > 60)).sum())


def test_query_map_command_writes_maps_and_scores_the_area(trained_clip, toy_dataset, tmp_path, capsys):
    out = tmp_path / "qmap"
    queries = ["Aleksanterinkatu", "Kamppi, Helsinki", "a lovely beach at sunset"]
    argv = ["--checkpoint", str(trained_clip), "--dataset", str(toy_dataset), "--out", str(out), "--batch-size", "7"]
    assert main(argv + [a for q in queries for a in ("--query", q)]) == 0
    report = json.loads((out / JSON_FILE).read_text())
    test = read_records(toy_dataset, "test")
    assert report["split"] == "test" and report["num_images"] == len(test)
    by_query = {q["query"]: q for q in report["queries"]}
    assert list(by_query) == queries and [q["png"] for q in report["queries"]] == png_names(queries)
    for q in report["queries"]:
        assert q["n_inside"] + q["n_outside"] == len(test)
        with Image.open(out / q["png"]) as im:
            assert im.format == "PNG" and im.size[0] > 400
    street, hood, nothing = (by_query[q] for q in queries)
    assert set(street["sub_streets"]) == _subs(test, street="Aleksanterinkatu")
    assert street["n_inside"] == int((test["street"] == "Aleksanterinkatu").sum())
    assert set(hood["sub_streets"]) == _subs(read_records(toy_dataset), neighbourhood="Kamppi")
    for q in (street, hood):
        assert 0.0 <= q["auc"] <= 1.0
    # the trained model lights up the street it was asked about (chance is 0.5)
    assert street["auc"] > 0.8 and street["mean_similarity_inside"] > street["mean_similarity_outside"]
    assert nothing["level"] is None and nothing["auc"] is None and nothing["n_inside"] == 0
    assert "no geometry matched" in capsys.readouterr().out
    # the matched area is outlined in red; an unmatched query has no outline
    assert _reddish(out / street["png"]) > 500 and _reddish(out / hood["png"]) > 200
    assert _reddish(out / nothing["png"]) == 0

    one = tmp_path / "one"
    assert main(argv[:4] + ["--out", str(one), "--query", "Esplanadi between Kaivokatu and Fredrikinkatu"]) == 0
    assert {p.name for p in one.iterdir()} == {SINGLE_PNG, JSON_FILE, ".address-llava.json"}  # no temporary files left
    assert json.loads((one / JSON_FILE).read_text())["queries"][0]["sub_streets"] == ["Esplanadi/1"]


def test_slugged_names_never_clash():
    assert png_names(["Kamppi, Helsinki", "kamppi helsinki", "Mannerheimintie"]) == [
        "query_map-kamppi-helsinki.png", "query_map-kamppi-helsinki-2.png", "query_map-mannerheimintie.png"]
    assert png_names(["Töölö"]) == [SINGLE_PNG] and png_names(["!!", "?"])[0] == "query_map-query.png"


@pytest.mark.parametrize("case, message", [
    ("missing dataset", "no such dataset folder"),
    ("empty query", "empty query"),
    ("unknown split", "unknown split 'tst'"),
    ("empty split", "split 'val' has no images"),
    ("missing checkpoint", "no such checkpoint folder"),
    ("missing image", "No such file"),
])
def test_bad_inputs_are_one_line_errors(case, message, toy_dataset, tmp_path, capsys):
    args = {"--model": "addressclip-tiny", "--dataset": str(toy_dataset), "--query": "Esplanadi",
            "--out": str(tmp_path / "out")}
    if case == "missing dataset":
        args["--dataset"] = str(tmp_path / "nope")
    elif case == "empty query":
        args["--query"] = "   "
    elif case == "unknown split":
        args["--split"] = "tst"
    elif case == "empty split":
        args["--split"] = "val"
    elif case == "missing image":
        args["--dataset"] = str(shutil.copytree(toy_dataset, tmp_path / "broken"))
        (tmp_path / "broken" / "images" / read_records(toy_dataset, "test")["image"].iloc[5]).unlink()
    else:
        del args["--model"]
        args["--checkpoint"] = str(tmp_path / "no-run")
    assert main([a for kv in args.items() for a in kv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("query-map: error: ") and message in err
    assert not (tmp_path / "out").exists()
    if case == "empty query":  # --debug (taken by the command guard) shows the traceback instead
        with pytest.raises(ValueError, match=message):
            main([a for kv in args.items() for a in kv] + ["--debug"])


def test_a_rerun_leaves_only_the_maps_its_report_lists(toy_dataset, tmp_path):
    out = tmp_path / "qmap"
    argv = ["--model", "addressclip-tiny", "--dataset", str(toy_dataset), "--out", str(out)]
    assert main(argv + ["--query", "Aleksanterinkatu", "--query", "Kamppi"]) == 0
    first = {q["png"] for q in json.loads((out / JSON_FILE).read_text())["queries"]}
    assert len(first) == 2 and all((out / n).is_file() for n in first)
    (out / "notes.txt").write_text("mine")  # the user's files in the folder are never the command's to remove
    (out / "query_map-mine.png").write_bytes(b"not a map of this command")
    # a killed run had drawn a map its report never listed: the marker names it, the next run removes it
    (out / "query_map-killed.png").write_bytes(b"x")
    marker = json.loads((out / ".address-llava.json").read_text())
    (out / ".address-llava.json").write_text(json.dumps({**marker, "maps": [*marker["maps"], "query_map-killed.png"]}))
    assert main(argv + ["--query", "Esplanadi"]) == 0
    listed = {q["png"] for q in json.loads((out / JSON_FILE).read_text())["queries"]}
    assert listed == {SINGLE_PNG}
    assert {p.name for p in out.iterdir()} == {SINGLE_PNG, JSON_FILE, ".address-llava.json", "notes.txt",
                                               "query_map-mine.png"}


def test_web_demo_address_query_box(toy_dataset):
    import gradio as gr
    from matplotlib.figure import Figure

    from clip_stage.model import create_clip
    from llava_address.apps.webdemo import Demo

    mapper = QueryMapper(create_clip("addressclip-tiny"), toy_dataset, QueryMapConfig(batch_size=16))
    demo = Demo(None, None, None, query_mapper=mapper)
    fig, info = demo.on_query("Kamppi, Helsinki")
    assert isinstance(fig, Figure) and fig.axes
    assert "neighbourhood **Kamppi, Helsinki** (6 sub-streets" in info and "AUC 0." in info
    _, info = demo.on_query("a lovely beach at sunset")
    assert info.startswith("no geometry matched") and "AUC n/a" in info
    with pytest.raises(gr.Error):
        demo.on_query("  ")
    with pytest.raises(gr.Error, match="no AddressCLIP"):
        Demo(None, None, None).on_query("Esplanadi")


def test_query_text_is_drawn_literally_not_as_mathtext():
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clip_stage.plots import plain_text

    fig, ax = plt.subplots()
    ax.set_title(r"Mannerheimintie $\foo$")  # what the query text did: matplotlib typesets it and fails
    with pytest.raises(ValueError):
        fig.savefig(io.BytesIO(), format="png")
    ax.set_title(plain_text(r"Mannerheimintie $\foo$, Kamppi $5 and $10"))
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)
