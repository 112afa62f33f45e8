"""`address-llava merge`: a LoRA checkpoint folds into a plain HF LLaVA folder that stock transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from llava_address.config import ModelArgs, TrainablesArgs
from llava_address.merge import main
from llava_address.checkpoint import load_for_inference
from llava_address.checkpoint import save_model_part
from llava_address.components import num_image_tokens
from llava_address.model import build_llava
from llava_address.trainables import apply_trainables
from llava_address.prompting import encode_conversation

CONV = [{"from": "human", "value": "<image>\nWhere was this photo taken?"},
        {"from": "gpt", "value": "Broadway & West 72nd Street, Upper West Side."}]


def _trained_checkpoint(path, margs, targs):
    model, processor = build_llava(margs)
    model, _ = apply_trainables(model, targs)
    enc = encode_conversation(CONV, processor.tokenizer, num_image_tokens(model.config), num_images=1)
    pv = processor.image_processor(images=[Image.new("RGB", (30, 40), (30, 200, 30))], return_tensors="pt")["pixel_values"]
    ids = torch.tensor([enc.input_ids])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, pixel_values=pv, labels=torch.tensor([enc.labels])).loss.backward()
        opt.step()
        opt.zero_grad()
    save_model_part(model, processor, path, margs, targs)
    return ids, pv


def test_merged_folder_loads_in_stock_transformers_with_adapter_logits(tiny_llava_dir, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    margs = ModelArgs(model_name_or_path=str(tiny_llava_dir))
    ids, pv = _trained_checkpoint(tmp_path / "ck", margs, TrainablesArgs(lora_r=8, lora_alpha=16))
    assert main(["--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "merged"), "--check"]) == 0
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "processor_config.json" in files
    assert not any(f.startswith("adapter") for f in files)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "llava"
    # stock transformers, no peft, no toolkit code
    merged = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "merged")).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapter_model, _ = load_for_inference(None, tmp_path / "ck")
    with torch.no_grad():
        want = adapter_model(input_ids=ids, pixel_values=pv).logits
        got = merged(input_ids=ids, pixel_values=pv).logits
        base = build_llava(margs)[0].eval()(input_ids=ids, pixel_values=pv).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-3)   # the LoRA and projector really were folded in
    out = processor(images=Image.new("RGB", (32, 32)), text="USER: <image>\nWhere? ASSISTANT:", return_tensors="pt")
    assert int((out["input_ids"] == merged.config.image_token_id).sum()) == 16
    gen = merged.generate(**out, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == out["input_ids"].shape[1] + 3 or gen[0, -1] == processor.tokenizer.eos_token_id


def test_merge_swapped_tower_projector_alignment(tiny_llava_dir, tiny_vision_tower_dir, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    margs = ModelArgs(model_name_or_path=str(tiny_llava_dir), vision_tower=str(tiny_vision_tower_dir))
    ids, pv = _trained_checkpoint(tmp_path / "ck", margs, TrainablesArgs(llm="frozen"))
    assert main(["--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "merged")]) == 0
    merged = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "merged")).eval()
    processor = AutoProcessor.from_pretrained(str(tmp_path / "merged"))
    assert merged.config.vision_config.hidden_size == 48 and processor.image_processor.crop_size["height"] == 48
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
    trained, _ = load_for_inference(None, tmp_path / "ck")
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids, pixel_values=pv).logits,
                              trained(input_ids=ids, pixel_values=pv).logits, atol=1e-5)


def test_merge_refuses_non_checkpoint(tmp_path, tiny_llava_dir, capsys):
    assert main(["--checkpoint", str(tiny_llava_dir), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("merge: ") and "not a LLaVA training checkpoint" in err and "\n" not in err
    assert main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()


def test_merge_never_writes_over_the_base_the_checkpoint_was_trained_on(tiny_llava_dir, tmp_path, capsys):
    """The base is read from the checkpoint, not given: it is an input all the same (merged over, the adapter
    would be orphaned and a second merge would apply it twice)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_llava_dir, base)
    from clip_stage.core.outdir import write_marker

    write_marker(base, "merge")  # even a folder that an earlier merge wrote
    _trained_checkpoint(tmp_path / "ck", ModelArgs(model_name_or_path=str(base)), TrainablesArgs(lora_r=4, lora_alpha=8))
    before = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    assert main(["--checkpoint", str(tmp_path / "ck"), "--out", str(base), "--overwrite"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == before


def test_a_model_folder_without_config_is_one_line_before_any_load(tmp_path):
    from clip_stage.core.outdir import ModelPathError

    (tmp_path / "noconf").mkdir()
    (tmp_path / "noconf" / "model.safetensors").write_bytes(b"weights")
    for args, message in ((ModelArgs(model_name_or_path=str(tmp_path / "noconf")), "no config.json"),
                          (ModelArgs(model_name_or_path=str(tmp_path / "noconf" / "model.safetensors")), "a file"),
                          (ModelArgs(model_name_or_path="runs/demo/llava/merged"), "no such folder"),
                          (ModelArgs(llm=str(tmp_path / "nope"), vision_tower="openai/clip"), "no such folder")):
        with pytest.raises(ModelPathError, match=message):
            build_llava(args)


def test_a_checkpoint_whose_stored_base_is_gone_names_the_options_that_replace_it(tiny_llava_dir, tmp_path, capsys):
    """A checkpoint stores its base's path (relative, in older versions, to where training ran): when it is not
    there, merge says to pass --base, not the training flag that stored it."""
    import shutil

    from llava_address.checkpoint import read_checkpoint_args
    from llava_address.merge import main as merge_main
    from llava_address.train import main as train_main

    base = tmp_path / "base"
    shutil.copytree(tiny_llava_dir, base)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "t", "conversations": [{"from": "human", "value": "Hi"},
                                                              {"from": "gpt", "value": "Hello there."}]}]))
    run = tmp_path / "run"
    assert train_main(["--config", "address_full", "--model-name-or-path", str(base), "--data-path", str(data),
                       "--output-dir", str(run), "--max-steps", "1", "--per-device-batch-size", "1",
                       "--global-batch-size", "1", "--torch-dtype", "float32", "--mixed-precision", "no",
                       "--no-gradient-checkpointing", "--no-progress-bar", "--report-to", "none"]) == 0
    ckpt = next(run.glob("checkpoint-*"))
    assert read_checkpoint_args(ckpt)[0].model_name_or_path == str(base.resolve())
    base.rename(tmp_path / "moved")
    assert merge_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err
    assert "was trained on model_name_or_path" in err and "--base" in err and "--model-name-or-path" not in err
    assert merge_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "merged"), "--base", str(tmp_path / "moved")]) == 0
