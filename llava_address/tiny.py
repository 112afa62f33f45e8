"""Tiny LLaVA-1.5 models built from configs, and a sentencepiece tokenizer trained on the fly.

Production code, not only test scaffolding: the CPU demo and the tests use it to exercise the whole LLaVA
stage without downloading weights. The shape lives in `model_configs/tiny-llava.json` (architectures are
data). A model built here and saved with `out_dir=` is a normal HF LLaVA checkpoint folder, so
`llava_address.model.build_llava(ModelArgs(model_name_or_path=folder))` loads it like a real one.

    tok = train_tokenizer(texts, "work/tok")
    model, processor = build_tiny_llava(tok, out_dir="work/tiny-llava")
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from clip_stage.core.fs import atomic_write_json
from conversations.records import IMAGE_TOKEN
from llava_address.prompting import VICUNA_V1_SYSTEM

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
PAD_TOKEN = "<pad>"
# OpenAI CLIP normalisation (what LLaVA-1.5's CLIP ViT-L/14-336 processor uses).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def list_tiny_configs() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def load_tiny_config(name: str = "tiny-llava") -> dict[str, Any]:
    """The architecture dict of a shape in model_configs/ (error lists the valid names)."""
    path = MODEL_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"unknown model config {name!r}; valid: {list_tiny_configs()}")
    cfg = json.loads(path.read_text())
    cfg.pop("_comment", None)
    return cfg


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 400,
                    model_max_length: int = 512):
    """Trains a Llama-style sentencepiece BPE tokenizer on `texts` and returns it as a transformers tokenizer.

    Llama conventions: <unk>=0, <s>=1 (BOS, added by the tokenizer), </s>=2, byte fallback, no text
    normalisation. `<pad>` and `<image>` are added as special tokens. The tokenizer is saved to `out_dir`
    (sentencepiece model + HF files) and can be reloaded with AutoTokenizer.from_pretrained(out_dir).
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("train_tokenizer needs at least one non-empty text")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        character_coverage=1.0, hard_vocab_limit=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, minloglevel=2,
        num_threads=1,
    )
    # add_bos_token=True: without it transformers 5's Llama tokenizer built from a bare .model adds no BOS.
    tok = LlamaTokenizer.from_pretrained(str(out), add_bos_token=True, add_eos_token=False)
    tok.add_special_tokens({"pad_token": PAD_TOKEN, "additional_special_tokens": [IMAGE_TOKEN]})
    tok.model_max_length = model_max_length
    tok.padding_side = "right"
    tok.save_pretrained(str(out))
    return tok


def _image_processor(image_size: int, mean=CLIP_MEAN, std=CLIP_STD):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=list(mean), image_std=list(std))


def build_tiny_vision_tower(out_dir: str | os.PathLike | None = None, seed: int = 0, image_mean=CLIP_MEAN,
                            image_std=CLIP_STD, with_projection: bool = False, **overrides):
    """A tiny CLIP vision tower + CLIPImageProcessor (the layout of an AddressCLIP export), optionally saved.

    `overrides` change the tiny vision config (e.g. hidden_size=48, image_size=48, patch_size=12) to
    exercise tower swaps. `with_projection` builds a CLIPVisionModelWithProjection, as `export-clip`
    writes. Returns (vision_model, image_processor).
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    vcfg = load_tiny_config()["vision_config"]
    vcfg.pop("model_type", None)
    vcfg.update(overrides)
    torch.manual_seed(seed)
    cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    tower = cls(CLIPVisionConfig(**vcfg))
    ip = _image_processor(vcfg["image_size"], image_mean, image_std)
    if out_dir is not None:
        tower.save_pretrained(str(out_dir))
        ip.save_pretrained(str(out_dir))
    return tower, ip


def build_tiny_llava(tokenizer, vision_tower: str | os.PathLike | None = None, vision_config: dict | None = None,
                     seed: int = 0, out_dir: str | os.PathLike | None = None, config_name: str = "tiny-llava"):
    """A randomly initialised tiny LlavaForConditionalGeneration and its LlavaProcessor.

    tokenizer: from `train_tokenizer` (must hold `<image>` and a pad token).
    vision_tower: a CLIPVisionModel folder to use as the tower (its weights, config and image processor).
    vision_config: overrides of the tiny vision config (ignored when `vision_tower` is given).
    out_dir: if given, model and processor are saved there (safetensors) as a loadable HF checkpoint.
    """
    from transformers import (AutoImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id or tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer needs an `{IMAGE_TOKEN}` special token and a pad token (use train_tokenizer)")
    arch = load_tiny_config(config_name)
    tower = None
    if vision_tower is not None:
        tower = CLIPVisionModel.from_pretrained(str(vision_tower))
        vcfg = tower.config
        image_processor = AutoImageProcessor.from_pretrained(str(vision_tower))
    else:
        vdict = {k: v for k, v in arch["vision_config"].items() if k != "model_type"}
        vdict.update(vision_config or {})
        vcfg = CLIPVisionConfig(**vdict)
        image_processor = _image_processor(vcfg.image_size)
    tdict = {k: v for k, v in arch["text_config"].items() if k != "model_type"}
    tcfg = LlamaConfig(**tdict, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    strategy = arch["vision_feature_select_strategy"]
    grid = (vcfg.image_size // vcfg.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vcfg, text_config=tcfg, image_token_id=image_token_id,
        projector_hidden_act=arch["projector_hidden_act"], vision_feature_layer=arch["vision_feature_layer"],
        vision_feature_select_strategy=strategy, image_seq_length=grid + (strategy == "full"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if tower is not None:
        model.model.vision_tower.load_state_dict(tower.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=vcfg.patch_size,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1,  # the CLS token
    )
    if out_dir is not None:
        from clip_stage.core.fs import atomic_dir

        with atomic_dir(out_dir) as tmp:  # a killed build leaves no half-written folder a resumed demo would take
            model.save_pretrained(str(tmp))
            processor.save_pretrained(str(tmp))
    return model, processor


def demo_texts(n: int = 200) -> list[str]:
    """A few hundred lines in the style of address Q&A: enough for a tiny tokenizer to cover its vocabulary."""
    streets = ["Main Street", "Oak Avenue", "Mannerheimintie", "Broadway", "Amsterdam Avenue", "West 72nd Street",
               "Elm Road", "Harbour Lane", "Aleksanterinkatu", "Forbes Avenue", "Craig Street"]
    areas = ["Downtown", "Kamppi", "Upper West Side", "Oakland", "Kluuvi", "Harbourside"]
    questions = ["Where was this photo taken?", "What street is this?", "Which neighbourhood is this?",
                 "Give the address of this place.", "What is the nearest cross street?"]
    lines = [VICUNA_V1_SYSTEM]
    for i in range(n):
        a, b = streets[i % len(streets)], streets[(i * 7 + 3) % len(streets)]
        lines.append(f"USER: {questions[i % len(questions)]} ASSISTANT: {a} & {b}, {areas[i % len(areas)]}. "
                     f"Photo {i} shows a street view of {a} near {b}.")
    return lines


def write_toy_llava_data(out_dir: str | os.PathLike, n: int = 12, seed: int = 0, turns: int = 2) -> Path:
    """Writes `train.json` (LLaVA format, `n` records) and `images/` (small solid-colour PNGs of varied sizes).

    Each record's colour decides its address, so a tiny model can learn the mapping. Returns `out_dir`.
    """
    import random

    from PIL import Image

    rng = random.Random(seed)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    places = [((200, 30, 30), "Main Street & Oak Avenue, Downtown"), ((30, 200, 30), "Broadway & West 72nd Street, "
              "Upper West Side"), ((30, 30, 200), "Mannerheimintie & Aleksanterinkatu, Kluuvi")]
    follow_ups = [("Which neighbourhood is this?", lambda a: a.split(", ")[-1] + "."),
                  ("What street is this?", lambda a: a.split(" & ")[0] + ".")]
    records = []
    for i in range(n):
        colour, address = places[i % len(places)]
        w, h = rng.choice([(40, 30), (30, 40), (32, 32), (64, 20)])
        rel = f"images/{i:04d}.png"
        Image.new("RGB", (w, h), colour).save(out / rel)
        conv = [{"from": "human", "value": f"{IMAGE_TOKEN}\nWhere was this photo taken?"},
                {"from": "gpt", "value": f"{address}."}]
        for q, answer in follow_ups[: max(0, turns - 1)]:
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": answer(address)}]
        records.append({"id": f"toy-{i:04d}", "image": rel, "conversations": conv})
    atomic_write_json(out / "train.json", records)
    return out
