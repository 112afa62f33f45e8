"""caption: a tiny random BLIP (built from its config, saved locally) fills the caption column, resumably."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from clip_stage.data.caption import main
from clip_stage.core.schema import read_records, write_records

WORDS = "a street view of the with red green blue buildings windows road car tree sky people shop sign".split()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor, BlipTextConfig, BlipVisionConfig)

    d = tmp_path_factory.mktemp("blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(d / "vocab.txt"), bos_token="[DEC]")
    text = BlipTextConfig(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                          pad_token_id=0, bos_token_id=vocab.index("[DEC]"), sep_token_id=3, eos_token_id=3)
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict()))
    model.save_pretrained(d)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(d)
    return d


def _argv(dataset, blip, *extra):
    return ["--dataset", str(dataset), "--model", str(blip), "--batch-size", "8", "--num-beams", "1",
            "--max-new-tokens", "6", "--min-new-tokens", "2", "--progress", "false", *map(str, extra)]


def test_caption_fills_the_column_and_resumes(toy_dataset, tiny_blip, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(toy_dataset, data)
    df = read_records(data)
    df["caption"] = ""
    df.loc[:9, "caption"] = "already captioned by hand"
    write_records(df, data / "records.parquet")

    # first run: a limited number of rows, as if the job were interrupted
    main(_argv(data, tiny_blip, "--limit", "20", "--save-every", "1"))
    after1 = read_records(data)
    assert (after1.loc[:9, "caption"] == "already captioned by hand").all()  # skipped
    new = after1.loc[10:29, "caption"]
    assert new.str.startswith("a street view of").all() and (new.str.len() > len("a street view of")).all()
    assert (after1.loc[30:, "caption"] == "").all()
    # the other columns are untouched
    pd.testing.assert_frame_equal(after1.drop(columns="caption"), df.drop(columns="caption"))

    # second run: finishes the rest, leaves the first 30 rows exactly as they were
    main(_argv(data, tiny_blip))
    after2 = read_records(data)
    assert (after2["caption"].str.strip() != "").all()
    pd.testing.assert_series_equal(after2.loc[:29, "caption"], after1.loc[:29, "caption"])
    info = (data / "dataset_info.json").read_text()
    assert str(tiny_blip) in info and "a street view of" in info

    # third run: nothing left
    mtime = (data / "records.parquet").stat().st_mtime_ns
    main(_argv(data, tiny_blip))
    assert (data / "records.parquet").stat().st_mtime_ns == mtime


def test_caption_one_split_only(toy_dataset, tiny_blip, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(toy_dataset, data)
    df = read_records(data).assign(caption="")
    write_records(df, data / "records.parquet")
    main(_argv(data, tiny_blip, "--split", "test"))
    out = read_records(data)
    assert (out.loc[out["split"] == "test", "caption"] != "").all()
    assert (out.loc[out["split"] == "train", "caption"] == "").all()


def test_caption_refuses_bad_options_and_non_blip_models_before_writing(toy_dataset, tiny_blip, tiny_llava_dir,
                                                                         tmp_path, capsys):
    data = tmp_path / "d"
    shutil.copytree(toy_dataset, data)
    write_records(read_records(data).assign(caption=""), data / "records.parquet")
    before = (data / "records.parquet").read_bytes()
    for extra, message in ((["--split", "bogus"], "--split 'bogus'"), (["--limit", "-5"], "--limit -5"),
                           (["--num-beams", "0"], "--num-beams 0"), (["--device", "bogus"], "--device bogus")):
        assert main(_argv(data, tiny_blip, *extra)) == 2
        assert message in capsys.readouterr().err
    # a LLaVA folder would load as BLIP with random weights and "caption" every row: refused
    assert main(["--dataset", str(data), "--model", str(tiny_llava_dir), "--progress", "false"]) == 2
    assert "not a BLIP captioner" in capsys.readouterr().err
    assert (data / "records.parquet").read_bytes() == before
