"""Self-describing, atomic training checkpoints of the LLaVA stage, and loading them back.

Every checkpoint `train-llava` writes (not only the last) is a folder that stands on its own. The model
part is llava_address.model.save_checkpoint's layout (shared with `merge` and chat); training adds two
entries for `--resume`:

    checkpoint-000120/
      adapter_config.json, adapter_model.safetensors   peft LoRA adapter (+ projector via modules_to_save)
      non_lora_trainables.safetensors                  other trained parameters (and the projector), plain names
      llava_args.json                                  ModelArgs + TrainablesArgs + data/train args + recipe text
      llava_config.json, processor files               the model config and the run's processor
      trainer_state.json                               step, epoch, data position, world size, accumulation,
                                                       the LR scheduler's state (JSON: nothing pickled)
      state/                                           accelerate save_state: model, optimizer, RNG, DeepSpeed shards
      manifest.json                                    size + sha256 of every file above

`load_checkpoint(folder)` (= model.load_for_inference) rebuilds the base model from the stored ModelArgs
and applies the trained weights: no training code and no `state/` needed.

The folder appears atomically (clip_stage.core.fs.atomic_dir, written by rank 0): a run killed while saving
leaves the previous checkpoints and no half-written one; its files are fsynced before the rename and listed
in manifest.json, which `resolve_resume` and `load_checkpoint` check (a damaged file is a one-line
CheckpointError naming it; `--resume latest` then falls back to the previous checkpoint).

Nothing in a checkpoint is unpickled on resume: the scheduler is JSON, accelerate reads the optimizer and
RNG files with torch.load(weights_only=True) (enforced here), no custom pickled objects are registered.
DeepSpeed's own shard loader unpickles (weights_only=False), so a DeepSpeed resume from a checkpoint outside
the run's --output-dir needs --trust-checkpoint (`check_resume_trust`). Under DeepSpeed ZeRO-3 every process holds a
shard of each parameter, so the trainable parameters are gathered (deepspeed.zero.GatheredParameters,
collectively, in chunks) before rank 0 writes them: the adapter is never the empty tensors that
`model.state_dict()` returns under ZeRO-3.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from clip_stage.core.fs import ManifestError, atomic_dir, atomic_write_json, load_error_text, verify_manifest
# The folder pattern, rotation and `--resume latest` are the same for both trainers (clip_stage.core.training).
from clip_stage.core.training import (  # noqa: F401 - part of this module's interface
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    prune_checkpoints,
)
from clip_stage.core.training import resolve_resume as _resolve_resume

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"


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
        with atomic_dir(path, verified=True) as tmp:
            # state_dict= keeps peft from reading model.state_dict(), which is empty under ZeRO-3.
            counts = save_model_part(unwrapped, processor, tmp, model_args, trainables, state_dict=state, extra=config)
            atomic_write_json(tmp / "trainer_state.json", {**trainer_state, "saved_tensors": counts})
            if save_training_state:
                os.replace(staging / "state", tmp / "state")
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def verify_checkpoint(path: str | os.PathLike, required: bool = True) -> None:
    """Checks a checkpoint folder against its manifest.json; CheckpointError names the first bad file.
    required=False accepts a folder without a manifest (written before manifests, or by other tools)."""
    try:
        verify_manifest(path, required=required)
    except ManifestError as e:
        raise CheckpointError(str(e)) from None


def resolve_resume(resume: str, output_dir: str | os.PathLike, report=print) -> Path | None:
    """The verified checkpoint folder `--resume` names; 'latest' is the newest intact one in output_dir
    (None if there is none). A damaged 'latest' candidate is reported through `report` (None: silent, for
    ranks other than 0) and the previous one is tried; an explicit folder that fails is an error."""
    if resume != "latest" and not (Path(resume) / TRAINER_STATE).is_file():
        raise CheckpointError(f"--resume {resume}: not a checkpoint folder with training state ({TRAINER_STATE})")
    return _resolve_resume(resume, output_dir, verify=verify_checkpoint, resumable=lambda p: (p / STATE_DIR).is_dir(),
                           command="train-llava", report=report)


def check_resume_trust(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, deepspeed: bool,
                       trust: bool) -> None:
    """Refuses a DeepSpeed resume from outside the run's own output folder unless the user trusts it:
    DeepSpeed reads its shards with torch.load(weights_only=False), so a crafted file can run code."""
    if not deepspeed or trust:
        return
    ckpt, out = Path(checkpoint).resolve(), Path(output_dir).resolve()
    if out not in ckpt.parents:
        raise CheckpointError(
            f"--resume {checkpoint}: a DeepSpeed checkpoint outside --output-dir {output_dir}; DeepSpeed unpickles "
            "its files, which can run code: pass --trust-checkpoint if you made it (or copy it into the run folder)"
        )


def check_state_files(state_dir: str | os.PathLike) -> None:
    """Refuses pickled custom objects, and reads accelerate's RNG files with weights_only=True before
    load_state does: accelerate silently skips an unreadable one, and the resumed run would then quietly
    differ from the uninterrupted one."""
    from accelerate.utils import load

    for f in sorted(Path(state_dir).glob("custom_checkpoint_*.pkl")):
        # accelerate would unpickle it with weights_only=False; train-llava registers no custom objects.
        raise CheckpointError(f"{f}: a pickled object (train-llava writes none: an older checkpoint, or planted); "
                              "refusing to load it")
    for f in sorted(Path(state_dir).glob("random_states_*.pkl")):
        try:
            load(f, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means the same thing: not a plain RNG state file
            raise CheckpointError(f"{f}: not a plain RNG state file ({load_error_text(e)})") from None


def load_checkpoint(path: str | os.PathLike, base=None, **model_overrides):
    """(model, processor) of a checkpoint folder in eval mode: base model + trained weights + adapter."""
    from llava_address.model import load_for_inference

    return load_for_inference(base, path, **model_overrides)  # checks the manifest when there is one
