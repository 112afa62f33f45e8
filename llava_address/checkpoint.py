"""Self-describing, atomic training checkpoints of the LLaVA stage, and loading them back.

Every checkpoint `train-llava` writes (not only the last) is a folder that stands on its own:

    checkpoint-000120/
      config.json             format tag + model / trainables / data / train args + the recipe text
      adapter/                peft LoRA adapter (adapter_config.json, adapter_model.safetensors); LoRA runs only
      trainables.safetensors  every trained parameter that is not LoRA (projector; the LLM in a full
                              fine-tune; the tower if it trained), under the plain LLaVA parameter names
      processor/              tokenizer + image processor of the run
      trainer_state.json      step, epoch and data position (for --resume)
      state/                  accelerate save_state: optimizer, scheduler, RNG, DeepSpeed shards (for --resume)

`load_checkpoint(folder)` rebuilds the base model from the stored ModelArgs (or a given base), loads
`trainables.safetensors` and the adapter: no training code and no `state/` needed.

The folder appears atomically (clip_stage.fsutil.atomic_dir, written by rank 0): a run killed while saving
leaves the previous checkpoints and no half-written one. Under DeepSpeed ZeRO-3 every process holds a
shard of each parameter, so the trainable parameters are gathered (deepspeed.zero.GatheredParameters,
collectively, in chunks) before rank 0 writes them: the adapter is never the empty tensors that
`model.state_dict()` returns under ZeRO-3.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from clip_stage.fsutil import atomic_dir, atomic_write_json

FORMAT = "llava_address.checkpoint/1"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_LORA_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


# --------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------


def is_lora_name(name: str) -> bool:
    return any(f".{m}." in name or name.startswith(f"{m}.") for m in _LORA_MARKERS)


def base_name(name: str) -> str:
    """A parameter name of a (peft-wrapped) model as the plain LlavaForConditionalGeneration names it."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
    name = name.replace(".base_layer.", ".")
    return name


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The step checkpoints in a run folder, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


# --------------------------------------------------------------------------------------------
# gathering (ZeRO-3 aware)
# --------------------------------------------------------------------------------------------


def gather_trainable_state(model: torch.nn.Module, is_main: bool, chunk: int = 64) -> dict[str, torch.Tensor]:
    """{full name: CPU tensor} of every trainable parameter of the unwrapped model; {} on other ranks.

    Collective under ZeRO-3 (every rank must call it): partitioned parameters are all-gathered in
    chunks of `chunk` tensors, copied on rank 0, and released again.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out: dict[str, torch.Tensor] = {}
    partitioned = any(hasattr(p, "ds_id") for _, p in named)
    if not partitioned:
        if is_main:
            out = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}
        return out
    import deepspeed

    for i in range(0, len(named), chunk):
        part = named[i:i + chunk]
        with deepspeed.zero.GatheredParameters([p for _, p in part], modifier_rank=None):
            if is_main:
                for n, p in part:
                    out[n] = p.detach().to("cpu", copy=True).contiguous()
    if is_main:
        empty = [n for n, t in out.items() if t.numel() == 0]
        if empty:
            raise RuntimeError(f"gathered parameters are empty (ZeRO-3 gather failed): {empty[:5]}")
    return out


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA tensors under their peft names, other trainables under plain LLaVA names)."""
    lora = {n: t for n, t in state.items() if is_lora_name(n)}
    rest = {base_name(n): t for n, t in state.items() if not is_lora_name(n)}
    return lora, rest


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike,
    *,
    accelerator,
    model: torch.nn.Module,
    processor: Any,
    config: dict[str, Any],
    trainer_state: dict[str, Any],
    save_training_state: bool = True,
) -> Path:
    """Writes one checkpoint folder atomically. Collective: every process must call it.

    model: the prepared (wrapped) model; config: JSON-able run description stored in config.json;
    trainer_state: step / epoch / data position stored in trainer_state.json.
    """
    from safetensors.torch import save_file

    path = Path(path)
    staging = path.parent / f".{path.name}.state-partial"
    is_main = accelerator.is_main_process
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state = gather_trainable_state(unwrapped, is_main)
    if save_training_state:
        # Every rank writes its own part (RNG; DeepSpeed optimizer/parameter shards).
        accelerator.save_state(str(staging / "state"), safe_serialization=True)
    accelerator.wait_for_everyone()
    if is_main:
        lora, rest = split_state(state)
        if not state:
            raise RuntimeError("nothing to save: the model has no trainable parameters")
        with atomic_dir(path) as tmp:
            if lora:
                if not hasattr(unwrapped, "peft_config"):
                    raise RuntimeError("LoRA parameters found but the model is not a peft model")
                # state_dict= keeps peft from reading model.state_dict(), which is empty under ZeRO-3.
                unwrapped.save_pretrained(str(tmp / "adapter"), state_dict=state, safe_serialization=True)
            if rest:
                save_file(rest, str(tmp / "trainables.safetensors"), metadata={"format": FORMAT})
            if processor is not None:
                processor.save_pretrained(str(tmp / "processor"))
            atomic_write_json(tmp / "config.json", {"format": FORMAT, **config})
            atomic_write_json(tmp / "trainer_state.json", trainer_state)
            if save_training_state:
                os.replace(staging / "state", tmp / "state")
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def prune_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Removes all but the newest `keep` step checkpoints; returns the removed folders."""
    if keep is None:
        return []
    ckpts = list_checkpoints(output_dir)
    removed = ckpts[:-keep] if len(ckpts) > keep else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a train-llava checkpoint (no config.json)")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {cfg.get('format')!r} (expected {FORMAT!r})")
    return cfg


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder `--resume` names; 'latest' is the newest in output_dir (None if there is none)."""
    if resume == "latest":
        ckpts = [p for p in list_checkpoints(output_dir) if (p / "state").is_dir()]
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / "state").is_dir() or not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder with training state (state/)")
    return path


def load_trainables_into(model: torch.nn.Module, path: str | os.PathLike) -> list[str]:
    """Copies trainables.safetensors of a checkpoint into a plain (not peft-wrapped) LLaVA; returns the names."""
    from safetensors.torch import load_file

    file = Path(path) / "trainables.safetensors"
    if not file.is_file():
        return []
    sd = load_file(str(file))
    missing_in_model = sorted(set(sd) - set(model.state_dict()))
    if missing_in_model:
        raise KeyError(f"{file}: parameters the model does not have: {missing_in_model[:5]}")
    model.load_state_dict(sd, strict=False)
    return sorted(sd)


def load_checkpoint(path: str | os.PathLike, model_args=None, *, is_trainable: bool = False):
    """(model, processor, config) of a checkpoint folder: base model + trainables + adapter.

    model_args: a ModelArgs to build the base from instead of the stored one (e.g. another path to the
    same base weights). The model is in eval mode unless `is_trainable`.
    """
    from llava_address.config import ModelArgs
    from llava_address.model import build_llava
    from llava_address.train_args import from_plain

    path = Path(path)
    cfg = read_config(path)
    if model_args is None:
        model_args = from_plain(ModelArgs, cfg["model"])
    model, processor = build_llava(model_args)
    load_trainables_into(model, path)
    if (path / "adapter").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path / "adapter"), is_trainable=is_trainable)
    if (path / "processor").is_dir():
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(path / "processor"))
    model.train(is_trainable)
    return model, processor, cfg
