"""Helpers shared by the LLaVA tests: reference logits, the tensors a checkpoint holds, a stand-in model folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def reference_logits(model, processor, data_dir) -> torch.Tensor:
    """Deterministic logits of the first two records of `data_dir/train.json` (eval mode, no dropout)."""
    from llava_address.data import LlavaCollator, LlavaDataset
    from llava_address.components import num_image_tokens

    cfg = model.config
    ds = LlavaDataset.from_file(Path(data_dir) / "train.json", processor, num_image_tokens(cfg),
                                image_token_id=cfg.image_token_id)
    batch = LlavaCollator(processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    batch.pop("labels")
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(**batch).logits
    model.train(was)
    return out


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor a train-llava checkpoint stores (adapter + non-LoRA trainables), keyed by file:name."""
    from safetensors.torch import load_file

    out = {}
    for f in ("adapter_model.safetensors", "non_lora_trainables.safetensors"):
        if (ckpt / f).is_file():
            out.update({f"{f}:{k}": v for k, v in load_file(str(ckpt / f)).items()})
    return out


def fake_model_folder(folder, weights: bytes, when: int):
    """A model folder (config + stand-in weights) whose files were written at `when` (seconds since the epoch)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llava"}')
    (folder / "model.safetensors").write_bytes(weights)
    for f in folder.iterdir():
        os.utime(f, ns=(when * 10**9, when * 10**9))
    return folder


def fake_adapter_checkpoint(folder, base, vision_tower):
    """A train-llava checkpoint folder as inference reads it before loading: the base and vision tower it was
    trained on (llava_args.json) and stand-in adapter weights."""
    import json

    folder.mkdir(parents=True)
    (folder / "llava_args.json").write_text(json.dumps(
        {"format": 1, "model": {"model_name_or_path": str(base), "vision_tower": str(vision_tower)}, "trainables": {}}))
    (folder / "adapter_model.safetensors").write_bytes(b"lora" * 16)
    return folder
