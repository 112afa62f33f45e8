"""The HF exports of `conversations` load together with `datasets`, and LLaMA-Factory's dataset_info.json
entries describe the `messages` files as LLaMA-Factory reads them."""

from __future__ import annotations

import json
import re

import pytest

from conversations import build, formats
from conversations.records import load_records


@pytest.fixture(scope="module")
def exported(toy_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv_hf") / "conv"
    assert build.main(["--dataset", str(toy_dataset), "--out", str(out),
                       "--formats", "llava,messages,hf-parquet,hf-disk"]) == 0
    return out


def test_parquet_splits_load_together_with_one_schema(exported):
    import datasets

    pq = exported / "hf_parquet"
    dd = datasets.load_dataset("parquet", data_files={"train": str(pq / "train.parquet"),
                                                      "eval": str(pq / "eval.parquet")})
    train, evaluation = load_records(exported / "train.json"), load_records(exported / "eval.json")
    assert dd["train"].features == dd["eval"].features
    assert set(dd["train"].column_names) >= {"id", "image", "conversations", "messages", "images", "turn_types",
                                             "candidates", "question_type", "reference"}
    assert dd["train"]["id"] == [r["id"] for r in train] and dd["eval"]["id"] == [r["id"] for r in evaluation]
    # not-applicable fields are null, the others are the records' own values
    assert dd["train"]["question_type"] == [None] * len(train) and dd["train"]["reference"] == [None] * len(train)
    assert dd["eval"]["turn_types"] == [None] * len(evaluation)
    assert dd["train"]["turn_types"] == [r["turn_types"] for r in train]
    assert dd["eval"]["question_type"] == [r["question_type"] for r in evaluation]
    assert dd["eval"][0]["reference"] == evaluation[0]["reference"]  # a struct with every key, values round-trip
    disk = datasets.load_from_disk(str(exported / "hf"))
    assert disk["train"].features == disk["eval"].features == dd["train"].features


def test_candidates_column_and_type_conflicts(exported, tmp_path):
    import datasets

    train, evaluation = load_records(exported / "train.json"), load_records(exported / "eval.json")
    train[0] = {**train[0], "candidates": ["Main Street 1", "Side Street 2"]}
    formats.export_hf(tmp_path / "pq", {"train": train, "eval": evaluation}, "parquet")
    dd = datasets.load_dataset("parquet", data_files={s: str(tmp_path / "pq" / f"{s}.parquet") for s in ("train", "eval")})
    assert dd["train"]["candidates"][:2] == [["Main Street 1", "Side Street 2"], None]
    assert set(dd["eval"]["candidates"]) == {None}
    # a column typed differently in the two splits cannot be one schema: refused, naming the splits
    bad = [{**r, "question_type": 3} for r in evaluation]
    with pytest.raises(ValueError, match=r"HF export.*\['eval', 'train'\]"):
        formats.export_hf(tmp_path / "bad", {"train": [{**train[1], "question_type": "street"}], "eval": bad}, "parquet")


def test_llamafactory_dataset_info_describes_the_messages_files(exported, toy_dataset):
    info = json.loads((exported / "dataset_info.json").read_text())
    assert sorted(info) == ["address_eval", "address_train"]
    assert json.loads((exported / "build_info.json").read_text())["files"]["llamafactory"] == "dataset_info.json"
    image_root = toy_dataset / "images"  # LLaMA-Factory's --media_dir
    for name, entry in info.items():
        assert entry["formatting"] == "sharegpt"
        assert entry["tags"] == {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                 "assistant_tag": "assistant"}
        # read the file the way LLaMA-Factory's sharegpt converter does: through the column and tag names
        records = load_records(exported / entry["file_name"])
        source = load_records(exported / f"{name.removeprefix('address_')}.json")
        assert len(records) == len(source) > 0
        cols, tags = entry["columns"], entry["tags"]
        for rec in records:
            msgs, images = rec[cols["messages"]], rec[cols["images"]]
            roles = [m[tags["role_tag"]] for m in msgs]
            assert roles == [tags["user_tag"], tags["assistant_tag"]] * (len(msgs) // 2) and len(msgs) % 2 == 0
            text = "".join(m[tags["content_tag"]] for m in msgs)
            assert len(re.findall("<image>", text)) == len(images) == 1  # one placeholder per image
            assert (image_root / images[0]).is_file()
