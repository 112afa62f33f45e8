"""Self-describing, atomic training checkpoints of the LLaVA stage, and loading them back.

Every checkpoint `train-llava` writes (not only the last) is a folder that stands on its own. The model
part is llava_address.model.save_checkpoint's layout (shared with `merge` and chat); training adds two
entries for `--resume`:

    checkpoint-000120/
      adapter_config.json, adapter_model.safetensors   peft LoRA adapter (+ projector via modules_to_save)
      non_lora_trainables.safetensors                  other trained parameters (and the projector), plain names
      llava_args.json                                  ModelArgs + TrainablesArgs + data/train args + recipe text
      llava_config.json, processor files               the model config and the run's processor
      trainer_state.json                               step, epoch, data position, world size, accumulation
      state/                                           accelerate save_state: optimizer, scheduler, RNG, DeepSpeed shards

`load_checkpoint(folder)` (= model.load_for_inference) rebuilds the base model from the stored ModelArgs
and applies the trained weights: no training code and no `state/` needed.

The folder appears atomically (clip_stage.fsutil.atomic_dir, written by rank 0): a run killed while saving
leaves the previous checkpoints and no half-written one. Under DeepSpeed ZeRO-3 every process holds a
shard of each parameter, so the trainable parameters are gathered (deepspeed.zero.GatheredParameters,
collectively, in chunks) before rank 0 writes them: the adapter is never the empty tensors that
`model.state_dict()` returns under ZeRO-3.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from clip_stage.fsutil import atomic_dir, atomic_write_json

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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
    """{full name: CPU tensor} of every trainable parameter (and the projector) of the unwrapped model on
    rank 0; {} on other ranks.

    Collective under ZeRO-3 (every rank must call it): partitioned parameters are all-gathered in
    chunks of `chunk` tensors, copied on rank 0, and released again.
    """
    from llava_address.model import component_of

    # The projector always goes into a checkpoint (it may be freshly initialised even when frozen).
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or component_of(n) == "projector"]
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


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike,
    *,
    accelerator,
    model: torch.nn.Module,
    processor: Any,
    model_args,
    trainables,
    config: dict[str, Any],
    trainer_state: dict[str, Any],
    save_training_state: bool = True,
) -> Path:
    """Writes one checkpoint folder atomically. Collective: every process must call it.

    model: the prepared (wrapped) model; model_args / trainables: the run's ModelArgs / TrainablesArgs;
    config: JSON-able rest of the run (data, train, recipe) stored in llava_args.json;
    trainer_state: step / epoch / data position stored in trainer_state.json.
    """
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
        from llava_address.model import save_checkpoint as save_model_part

        if not any(p.requires_grad for p in unwrapped.parameters()):
            raise RuntimeError("nothing to save: the model has no trainable parameters")
        with atomic_dir(path) as tmp:
            # state_dict= keeps peft from reading model.state_dict(), which is empty under ZeRO-3.
            counts = save_model_part(unwrapped, processor, tmp, model_args, trainables, state_dict=state, extra=config)
            atomic_write_json(tmp / "trainer_state.json", {**trainer_state, "saved_tensors": counts})
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


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder `--resume` names; 'latest' is the newest in output_dir (None if there is none)."""
    if resume == "latest":
        ckpts = [p for p in list_checkpoints(output_dir) if (p / "state").is_dir()]
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / "state").is_dir() or not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder with training state (state/)")
    return path


def load_checkpoint(path: str | os.PathLike, base=None, **model_overrides):
    """(model, processor) of a checkpoint folder in eval mode: base model + trained weights + adapter."""
    from llava_address.model import load_for_inference

    return load_for_inference(base, path, **model_overrides)
