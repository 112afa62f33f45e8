"""Original LLaVA checkpoints (haotian-liu/LLaVA layout, written here in miniature): `convert-llava` gives a HF
LLaVA whose logits equal LLaVA's own forward (tower layer -2 patches -> mlp2x_gelu -> spliced into the Llama
embeddings); loading the original folder directly is refused with one line; `--init-from` takes an
`mm_projector.bin`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_IMG = 16


class NotATensor:
    """Any pickled object: a weights-only load must refuse it."""


@pytest.fixture(scope="module")
def original_llava(tmp_path_factory, tiny_llava_dir):
    """A tiny LLaVA-1.5 checkpoint in the original layout: llava_llama config with mm_* fields, `model.*` Llama
    weights + lm_head + model.mm_projector.{0,2}.*, a tokenizer WITHOUT `<image>`/`<pad>` (LLaVA adds neither),
    and the CLIP tower in a separate folder (the config names a hub id). Returns (folder, tower folder, weights)."""
    import sentencepiece  # noqa: F401  (the slow->fast conversion needs it)
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    from llava_address.tiny import build_tiny_vision_tower, load_tiny_config

    root = tmp_path_factory.mktemp("orig_llava")
    tower_dir = root / "clip-vit-tiny"
    tower, _ = build_tiny_vision_tower(tower_dir, seed=3)
    ckpt = root / "llava-v1.5-tiny"
    ckpt.mkdir()
    shutil.copy(tiny_llava_dir.parent / "tokenizer" / "tokenizer.model", ckpt / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(str(ckpt), add_bos_token=True)
    tok.save_pretrained(str(ckpt))
    assert tok.convert_tokens_to_ids("<image>") in (None, tok.unk_token_id)
    tcfg = {k: v for k, v in load_tiny_config()["text_config"].items() if k != "model_type"}
    torch.manual_seed(5)
    llm = LlamaForCausalLM(LlamaConfig(**tcfg, vocab_size=len(tok), bos_token_id=1, eos_token_id=2))
    hidden, mm_hidden = llm.config.hidden_size, tower.config.hidden_size
    proj = torch.nn.Sequential(torch.nn.Linear(mm_hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
    weights = {k: v.contiguous() for k, v in llm.state_dict().items()}
    weights.update({f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()})
    save_file(weights, str(ckpt / "model.safetensors"))
    config = {**llm.config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
              "mm_hidden_size": mm_hidden, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
              "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "use_mm_proj": True,
              "torch_dtype": "float32"}
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt, tower_dir, {"llm": llm, "tower": tower, "projector": proj, "tokenizer": tok}


@torch.no_grad()
def _llava_reference_logits(parts, ids_before, ids_after, pixel_values):
    """LLaVA's own forward: CLIP hidden_states[-2] without CLS -> projector, between the text embeddings."""
    feats = parts["tower"](pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    image_embeds = parts["projector"](feats)
    emb = parts["llm"].get_input_embeddings()
    embeds = torch.cat([emb(torch.tensor([ids_before])), image_embeds, emb(torch.tensor([ids_after]))], dim=1)
    return parts["llm"](inputs_embeds=embeds).logits


def test_convert_llava_reproduces_llavas_forward(original_llava, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_address.convert_llava import main
    from llava_address.prompting import encode_conversation

    ckpt, tower_dir, parts = original_llava
    out = tmp_path / "hf"
    assert main(["--model-path", str(ckpt), "--vision-tower", str(tower_dir), "--out", str(out)]) == 0
    model = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    assert model.config.image_token_id == image_id and image_id >= len(parts["tokenizer"])
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    # the processor prompts with LLaVA-1.5's template
    assert "curious user" in processor.chat_template

    conv = [{"from": "human", "value": "<image>\nWhere was this photo taken?"}]
    ids = encode_conversation(conv, tok, N_IMG, num_images=1)
    ids = ids.input_ids if hasattr(ids, "input_ids") else ids
    first, last = ids.index(image_id), len(ids) - ids[::-1].index(image_id)
    assert last - first == N_IMG
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids]), pixel_values=pixel_values).logits
    want = _llava_reference_logits(parts, ids[:first], ids[last:], pixel_values)
    # the new <image>/<pad> rows widen the vocabulary: compare the original vocabulary's logits
    assert got.shape[1] == want.shape[1]
    assert torch.allclose(got[..., : want.shape[-1]], want, atol=1e-5), (got[..., : want.shape[-1]] - want).abs().max()


def test_original_layout_is_refused_with_one_line(original_llava, capsys):
    from llava_address.config import ModelArgs
    from llava_address.convert_llava import OriginalLlavaError
    from llava_address.model import build_llava

    ckpt, _, _ = original_llava
    with pytest.raises(OriginalLlavaError, match="convert-llava") as e:
        build_llava(ModelArgs(model_name_or_path=str(ckpt)))
    assert "\n" not in str(e.value)


def test_convert_refuses_a_wrong_tower_in_one_line(original_llava, tiny_vision_tower_dir, tmp_path, capsys):
    from llava_address.convert_llava import main

    ckpt, _, _ = original_llava
    assert main(["--model-path", str(ckpt), "--vision-tower", str(tiny_vision_tower_dir), "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' own loading progress
    assert err.startswith("convert-llava: ") and "mm_hidden_size" in err and not (tmp_path / "x").exists()


def test_init_from_accepts_llavas_mm_projector_bin(original_llava, tiny_llava_dir, tmp_path):
    from llava_address.config import ModelArgs
    from llava_address.convert_llava import OriginalLlavaError
    from llava_address.model import build_llava
    from llava_address.train_inputs import load_stage_weights

    model, _ = build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir)))
    hidden = model.config.text_config.hidden_size
    mm = model.config.vision_config.hidden_size
    torch.manual_seed(9)
    proj = torch.nn.Sequential(torch.nn.Linear(mm, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
    folder = tmp_path / "pretrain"
    folder.mkdir()
    # LLaVA's projector pre-training saves exactly this: a plain state dict, keys model.mm_projector.*
    torch.save({f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}, folder / "mm_projector.bin")
    loaded = load_stage_weights(model, folder)
    assert loaded == sorted(f"model.multi_modal_projector.linear_{i}.{w}" for i in (1, 2) for w in ("bias", "weight"))
    mp = model.model.multi_modal_projector
    assert torch.equal(mp.linear_1.weight, proj[0].weight) and torch.equal(mp.linear_2.bias, proj[2].bias)
    # the file itself works too; anything but plain tensors is refused, never unpickled
    assert load_stage_weights(model, folder / "mm_projector.bin") == loaded
    torch.save({"model.mm_projector.0.weight": NotATensor()}, tmp_path / "evil.bin")
    with pytest.raises(OriginalLlavaError, match="evil.bin"):
        load_stage_weights(model, tmp_path / "evil.bin")


def test_convert_names_missing_folders_and_bad_templates_in_one_line(original_llava, tiny_vision_tower_dir, tmp_path,
                                                                      capsys):
    from llava_address.convert_llava import main

    ckpt, _, _ = original_llava
    for argv, message in ((["--model-path", str(tmp_path / "nope"), "--vision-tower", str(tiny_vision_tower_dir)],
                           "--model-path"),
                          (["--model-path", str(ckpt), "--vision-tower", "openai/clip-vit-large-patch14-336"],
                           "--vision-tower"),  # a hub id is not a local folder: said at once, no download attempt
                          (["--model-path", str(ckpt), "--vision-tower", str(tiny_vision_tower_dir), "--template",
                            "bogus"], "unknown conversation template 'bogus'")):
        assert main([*argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("convert-llava: error: ") and message in err and not err.endswith('"')
    assert not (tmp_path / "x").exists()
