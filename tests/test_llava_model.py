"""build_llava / tower swap / compose / apply_trainables / checkpoints on tiny LLaVA models (CPU, no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from llava_address.config import ModelArgs, TrainablesArgs
from llava_address.checkpoint import load_for_inference
from llava_address.checkpoint import save_model_part
from llava_address.components import check_processor, fresh_projector, num_image_tokens
from llava_address.model import build_llava
from llava_address.trainables import apply_trainables, component_of, lora_target_names
from llava_address.prompting import encode_conversation

CONV = [{"from": "human", "value": "<image>\nWhere was this photo taken?"},
        {"from": "gpt", "value": "Main Street & Oak Avenue, Downtown."}]


def _batch(model, processor, size=(40, 30), colour=(200, 30, 30)):
    enc = encode_conversation(CONV, processor.tokenizer, num_image_tokens(model.config), num_images=1)
    pv = processor.image_processor(images=[Image.new("RGB", size, colour)], return_tensors="pt")["pixel_values"]
    ids = torch.tensor([enc.input_ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([enc.labels]),
            "pixel_values": pv}


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train_steps(model, batch, steps=3, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_build_llava_by_path_matches_processor(tiny_llava_dir):
    model, processor = build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir)))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert num_image_tokens(model.config) == 16 == model.config.image_seq_length
    # the processor's own expansion of <image> agrees with ours
    out = processor(images=Image.new("RGB", (32, 32)), text="<image> hi", return_tensors="pt")
    assert int((out["input_ids"] == model.config.image_token_id).sum()) == 16
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    check_processor(model.config, processor)
    model32, _ = build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir), torch_dtype="bfloat16"))
    assert model32.dtype == torch.bfloat16


def test_swap_tower_with_different_hidden_size_end_to_end(tiny_llava_dir, tiny_vision_tower_dir, caplog):
    base, base_proc = build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir)))
    with caplog.at_level("WARNING"):
        model, processor = build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir),
                                                 vision_tower=str(tiny_vision_tower_dir)))
    assert "projector re-initialised" in caplog.text
    vc = model.config.vision_config
    assert (vc.hidden_size, vc.image_size, vc.patch_size) == (48, 48, 12)
    assert model.model.multi_modal_projector.linear_1.in_features == 48
    # processor follows the tower: size and mean/std from the tower's image processor config
    assert processor.image_processor.crop_size["height"] == 48
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
    assert processor.patch_size == 12
    assert num_image_tokens(model.config) == model.config.image_seq_length == 16
    # tower weights really are the swapped-in ones
    from transformers import CLIPVisionModel
    ref = CLIPVisionModel.from_pretrained(str(tiny_vision_tower_dir))
    for (n, p), (_, q) in zip(model.model.vision_tower.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n
    # LLM untouched
    for (n, p), (_, q) in zip(model.model.language_model.state_dict().items(), base.model.language_model.state_dict().items()):
        assert torch.equal(p, q), n
    # end to end: forward + loss + backward through the new projector, on the new image size
    batch = _batch(model, processor)
    assert batch["pixel_values"].shape[-1] == 48
    model, _ = apply_trainables(model, TrainablesArgs(llm="frozen"))
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    # the old processor would feed the wrong size: refused, never silent
    with pytest.raises(ValueError, match="processor and model disagree"):
        check_processor(model.config, base_proc)


def test_fresh_projector_does_not_depend_on_the_rng_state_before_it(tiny_llava_dir, tiny_vision_tower_dir):
    # ZeRO-3-aware loading draws random numbers while loading the base: the new projector must not notice
    args = ModelArgs(model_name_or_path=str(tiny_llava_dir), vision_tower=str(tiny_vision_tower_dir))
    torch.manual_seed(1)
    first, _ = build_llava(args)
    torch.manual_seed(2)
    torch.randn(1000)
    second, _ = build_llava(args)
    for (n, p), (_, q) in zip(first.model.multi_modal_projector.state_dict().items(),
                              second.model.multi_modal_projector.state_dict().items()):
        assert torch.equal(p, q), n
    # and it leaves the caller's random stream where it was (LoRA is initialised from it next)
    state = torch.get_rng_state()
    fresh_projector(first.config, "cpu", torch.float32)
    assert torch.equal(torch.get_rng_state(), state)


def test_tower_loads_without_a_load_report_for_the_unused_projection(tiny_vision_tower_dir, tmp_path, capfd, caplog):
    import shutil

    from safetensors.torch import load_file, save_file

    from llava_address.components import load_tower

    load_tower(str(tiny_vision_tower_dir))  # export-clip's CLIPVisionModelWithProjection: the head is dropped
    err = capfd.readouterr().err
    assert "UNEXPECTED" not in err and "LOAD REPORT" not in err
    # weights that belong to no CLIP part are still reported, by us
    stray = tmp_path / "stray"
    shutil.copytree(tiny_vision_tower_dir, stray)
    weights = load_file(str(stray / "model.safetensors"))
    save_file({**weights, "extra_head.weight": torch.zeros(2, 2)}, str(stray / "model.safetensors"),
              metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="llava_address.model"):
        load_tower(str(stray))
    assert "1 weights not used by a CLIPVisionModel" in caplog.text and "extra_head.weight" in caplog.text


def test_swap_tower_of_same_shape_keeps_projector(tiny_llava_dir, tmp_path):
    from llava_address.tiny import build_tiny_vision_tower

    build_tiny_vision_tower(tmp_path / "same", seed=5)
    base, _ = build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir)))
    model, _ = build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir), vision_tower=str(tmp_path / "same")))
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, base.model.multi_modal_projector.linear_1.weight)
    assert not torch.equal(model.model.vision_tower.embeddings.patch_embedding.weight,
                           base.model.vision_tower.embeddings.patch_embedding.weight)


def test_tower_without_image_processor_is_refused(tiny_llava_dir, tmp_path):
    from llava_address.tiny import build_tiny_vision_tower

    tower, _ = build_tiny_vision_tower(None, hidden_size=48, intermediate_size=96)
    tower.save_pretrained(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match="image processor"):
        build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir), vision_tower=str(tmp_path / "bare")))


def test_compose_from_llm_and_tower(tmp_path, tiny_vision_tower_dir):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    from llava_address.tiny import demo_texts, train_tokenizer

    # a plain Llama LM whose tokenizer has neither <image> nor <pad>
    tok = train_tokenizer(demo_texts(60), tmp_path / "tok")
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes((tmp_path / "tok" / "tokenizer.model").read_bytes())
    plain = LlamaTokenizer.from_pretrained(str(tmp_path / "spm"), add_bos_token=True)
    assert plain.pad_token is None
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(plain), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512))
    llm.save_pretrained(str(tmp_path / "llm"))
    plain.save_pretrained(str(tmp_path / "llm"))
    args = ModelArgs(llm=str(tmp_path / "llm"), vision_tower=str(tiny_vision_tower_dir))
    model, processor = build_llava(args)
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    assert model.config.projector_hidden_act == "gelu"
    assert model.model.multi_modal_projector.linear_1.in_features == 48
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert processor.tokenizer.pad_token is not None
    assert model.get_input_embeddings().weight.shape[0] >= len(processor.tokenizer)
    # the LLM weights are the LLM's
    assert torch.equal(model.model.language_model.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight)
    batch = _batch(model, processor)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    # deterministic rebuild (new token rows are not sampled), so a checkpoint reloads onto the same base
    again, _ = build_llava(args)
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    del tok


@pytest.mark.parametrize("spec,expected", [
    (dict(), {"lora", "projector"}),
    (dict(llm="frozen"), {"projector"}),                         # projector alignment
    (dict(llm="full", projector="frozen"), {"llm"}),
    (dict(llm="full", vision_tower="full"), {"llm", "projector", "vision_tower"}),
    (dict(llm="lora", projector="frozen", vision_tower="full"), {"lora", "vision_tower"}),
])
def test_only_intended_components_train(tiny_llava_dir, spec, expected):
    model, processor = build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir)))
    model, summary = apply_trainables(model, TrainablesArgs(lora_r=8, lora_alpha=16, **spec))
    trainable = {c for c, v in summary.items() if c != "all" and v["trainable"]}
    assert trainable == expected
    before = _snapshot(model)
    losses = _train_steps(model, _batch(model, processor), lr=1e-3 if "full" in spec.values() else 1e-2)
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        comp = component_of(name)
        if "lora_B" in name or "lora_A" in name:
            assert changed, name  # adapter weights move
        elif p.requires_grad and comp in ("projector", "llm", "vision_tower") and name.endswith("weight") \
                and "embed_tokens" not in name and "norm" not in name and "position" not in name \
                and "encoder.layers.1." not in name:  # the tower's last layer is unused (feature layer -2)
            assert changed, name
        if not p.requires_grad:
            assert not changed, name  # frozen weights (LoRA's base weights included) never move


def test_lora_targets_only_language_model(tiny_llava_dir):
    model, _ = build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir)))
    names = lora_target_names(model, TrainablesArgs().lora_target_regex)
    assert len(names) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(".language_model." in f".{n}." for n in names)
    peft_model, _ = apply_trainables(model, TrainablesArgs(lora_r=4, lora_alpha=8))
    lora_modules = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    assert lora_modules and not any("vision_tower" in n for n in lora_modules)
    assert not any("lm_head" in n or "multi_modal_projector" in n for n in lora_modules)
    # a leaf-name target would hit the CLIP tower's q_proj too: refused
    model2, _ = build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir)))
    with pytest.raises(ValueError, match="outside the language model"):
        apply_trainables(model2, TrainablesArgs(lora_target_regex=r".*q_proj"))
    with pytest.raises(ValueError, match="matches no module"):
        apply_trainables(model2, TrainablesArgs(lora_target_regex=r"nothing\.here"))


def test_lora_defaults_are_llava15():
    t = TrainablesArgs()
    assert (t.lora_r, t.lora_alpha, t.lora_dropout) == (128, 256, 0.05)
    assert (t.vision_tower, t.projector, t.llm) == ("frozen", "full", "lora")
    with pytest.raises(ValueError, match="nothing would train"):
        TrainablesArgs(llm="frozen", projector="frozen")
    with pytest.raises(ValueError):
        ModelArgs()
    with pytest.raises(ValueError):
        ModelArgs(llm="x")  # composing needs a tower


@pytest.mark.parametrize("spec", [dict(), dict(llm="frozen"), dict(llm="full", projector="frozen"),
                                  dict(vision_tower="full")])
def test_checkpoint_roundtrip_same_logits(tiny_llava_dir, tmp_path, spec):
    margs = ModelArgs(model_name_or_path=str(tiny_llava_dir))
    targs = TrainablesArgs(lora_r=8, lora_alpha=16, **spec)
    model, processor = build_llava(margs)
    model, _ = apply_trainables(model, targs)
    batch = _batch(model, processor)
    _train_steps(model, batch, steps=2)
    # as train-llava passes it under ZeRO-3: only the (gathered) trainable parameters and the projector
    partial = {n: p.detach().clone() for n, p in model.named_parameters()
               if p.requires_grad or component_of(n) == "projector"}
    counts = save_model_part(model, processor, tmp_path / "ck", margs, targs, state_dict=partial, extra={"note": "x"})
    assert (counts["adapter_tensors"] > 0) == (targs.llm == "lora")
    stored = json.loads((tmp_path / "ck" / "llava_args.json").read_text())
    assert stored["trainables"]["llm"] == targs.llm and stored["note"] == "x"
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    loaded, proc2 = load_for_inference(None, tmp_path / "ck")
    with torch.no_grad():
        got = loaded(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    assert torch.allclose(ref, got, atol=1e-6)
    fresh, _ = build_llava(margs)
    with torch.no_grad():
        base_logits = fresh(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    assert not torch.allclose(ref, base_logits, atol=1e-4)  # the checkpoint really carried the training


def test_checkpoint_with_swapped_tower_rebuilds_swap(tiny_llava_dir, tiny_vision_tower_dir, tmp_path):
    margs = ModelArgs(model_name_or_path=str(tiny_llava_dir), vision_tower=str(tiny_vision_tower_dir))
    targs = TrainablesArgs(llm="frozen")  # projector alignment after a swap
    model, processor = build_llava(margs)
    model, _ = apply_trainables(model, targs)
    batch = _batch(model, processor)
    _train_steps(model, batch, steps=2)
    save_model_part(model, processor, tmp_path / "ck", margs, targs)
    loaded, proc2 = load_for_inference(None, tmp_path / "ck")
    assert proc2.image_processor.crop_size["height"] == 48
    with torch.no_grad():
        a = model.eval()(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        b = loaded(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    assert torch.allclose(a, b, atol=1e-6)
    # the base without the tower cannot take this checkpoint: an error, not a silent mismatch
    with pytest.raises(ValueError, match="vision tower"):
        load_for_inference(ModelArgs(model_name_or_path=str(tiny_llava_dir)), tmp_path / "ck")


def test_qlora_4bit_on_cpu_trains_adapter(tiny_llava_dir):
    margs = ModelArgs(model_name_or_path=str(tiny_llava_dir), load_in_4bit=True, bnb_4bit_compute_dtype="float32",
                      device_map="cpu")
    model, processor = build_llava(margs)
    assert any("4bit" in type(m).__name__ for m in model.model.language_model.modules())
    assert not any("4bit" in type(m).__name__ for m in model.model.vision_tower.modules())
    model, summary = apply_trainables(model, TrainablesArgs(lora_r=8, lora_alpha=16))
    with pytest.raises(ValueError, match="quantised"):
        m2, _ = build_llava(margs)
        apply_trainables(m2, TrainablesArgs(llm="full"))
    before = _snapshot(model)
    model.train()  # bitsandbytes CPU trap: never an eval no-grad forward before training
    _train_steps(model, _batch(model, processor), steps=2, lr=1e-2)
    lora_changed = [n for n, p in model.named_parameters() if "lora_B" in n and not torch.equal(before[n], p)]
    assert lora_changed


def test_llava15_7b_shapes_on_meta_device():
    """The real llava-1.5-7b layout (built on the meta device, nothing allocated): 576 image tokens, LoRA on
    the 32 decoder layers' 7 linears each and nowhere in the 24-layer CLIP tower."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(image_token_id=32000)  # the defaults are llava-hf/llava-1.5-7b-hf's shapes
    assert num_image_tokens(config) == 576
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    names = lora_target_names(model, TrainablesArgs().lora_target_regex)
    assert len(names) == 32 * 7 and all(".language_model." in f".{n}." for n in names)
    ip = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})

    class _Tok:
        def convert_tokens_to_ids(self, t):
            return 32000

    from types import SimpleNamespace
    proc = SimpleNamespace(image_processor=ip, tokenizer=_Tok(), patch_size=14, num_additional_image_tokens=1,
                           vision_feature_select_strategy="default")
    check_processor(config, proc)
    with pytest.raises(ValueError, match="image tokens"):
        check_processor(config, SimpleNamespace(**{**vars(proc), "num_additional_image_tokens": 0}))


def test_dataclass_flags_roundtrip():
    import argparse

    from clip_stage.core.config import add_dataclass_args, dataclass_from_args, field_docs
    from llava_address.config import DataArgs

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ModelArgs)
    add_dataclass_args(parser, TrainablesArgs, prefix="trainables_")
    help_text = parser.format_help()
    assert "--model-name-or-path" in help_text and "QLoRA" in help_text  # help comes from the field docstrings
    ns = parser.parse_args(["--model-name-or-path", "m", "--load-in-4bit", "--bnb-4bit-use-double-quant", "false",
                            "--trainables-llm", "frozen", "--trainables-lora-r", "8"])
    margs = dataclass_from_args(ModelArgs, ns)
    assert margs.model_name_or_path == "m" and margs.load_in_4bit and not margs.bnb_4bit_use_double_quant
    assert margs.torch_dtype == "auto"  # not given: the default
    targs = dataclass_from_args(TrainablesArgs, ns, prefix="trainables_", base={"projector": "full", "lora_r": 4})
    assert (targs.llm, targs.lora_r, targs.projector) == ("frozen", 8, "full")  # flags override the base (YAML)
    with pytest.raises(SystemExit):
        parser.parse_args(["--trainables-llm", "half"])  # Literal -> choices
    with pytest.raises(ValueError, match="unknown DataArgs fields"):
        dataclass_from_args(DataArgs, argparse.Namespace(), base={"data_pth": "x"})
    assert "Regex fully matching" in field_docs(TrainablesArgs)["lora_target_regex"]


def test_tower_with_missing_weights_is_refused(tiny_llava_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from llava_address.tiny import build_tiny_vision_tower

    build_tiny_vision_tower(tmp_path / "t", hidden_size=48, intermediate_size=96)
    weights = load_file(str(tmp_path / "t" / "model.safetensors"))
    dropped = {k: v for k, v in weights.items() if "layers.0.mlp.fc1" not in k}
    assert len(dropped) < len(weights)
    save_file(dropped, str(tmp_path / "t" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir), vision_tower=str(tmp_path / "t")))


def test_a_tiny_llava_folder_is_written_whole_with_shared_modes(tiny_llava_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, LlavaProcessor

    from llava_address.tiny import build_tiny_llava

    assert all(p.stat().st_mode & 0o044 for p in tiny_llava_dir.iterdir() if p.is_file())  # not owner-only (0600)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llava_dir)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving the processor")

    monkeypatch.setattr(LlavaProcessor, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_llava(tokenizer, seed=0, out_dir=tmp_path / "base_init")
    assert list(tmp_path.iterdir()) == []  # no config.json without its weights and processor: a resume rebuilds it
