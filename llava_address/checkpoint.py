"""Self-describing, atomic training checkpoints of the LLaVA stage, and loading them back.

Every checkpoint `train-llava` writes (not only the last) is a folder that stands on its own. The model
part is `save_model_part`'s layout (shared with `merge` and chat; file names in llava_address.checkpoint_layout);
training adds two
entries for `--resume`:

    checkpoint-000120/
      adapter_config.json, adapter_model.safetensors   LoRA runs: the peft adapter (+ the projector via
                                                       modules_to_save when it trains)
      non_lora_trainables.safetensors                  what the adapter does not hold, plain names: the other
                                                       trained parameters, and the projector unless the adapter
                                                       has it (empty in a LoRA run with only LLM + projector)
      llava_args.json                                  ModelArgs + TrainablesArgs + data/train args + recipe text
      llava_config.json, processor files               the model config and the run's processor
      trainer_state.json                               step, epoch, data position, world size, accumulation,
                                                       the LR scheduler's state (JSON: nothing pickled)
      state/                                           accelerate save_state: model, optimizer, RNG, DeepSpeed shards
      manifest.json                                    size + sha256 of every file above

`load_checkpoint(folder)` (= `load_for_inference`) rebuilds the base model from the stored ModelArgs
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

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from clip_stage.core.config import asdict
from clip_stage.core.fs import ManifestError, atomic_dir, atomic_write_json, load_error_text, verify_manifest
from clip_stage.core.outdir import ModelPathError, check_model_folder
# The folder pattern, rotation and `--resume latest` are the same for both trainers (clip_stage.core.training).
from clip_stage.core.training import (  # noqa: F401 - part of this module's interface
    CheckpointError,
    checkpoint_name,
    list_checkpoints,
    prune_checkpoints,
)
from clip_stage.core.training import resolve_resume as _resolve_resume
from llava_address.checkpoint_layout import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ARGS_FILE, CHECKPOINT_FORMAT,
                                             LLAVA_CONFIG_FILE, NON_LORA_WEIGHTS, read_checkpoint_args)
from llava_address.components import check_processor
from llava_address.config import ModelArgs, TrainablesArgs
from llava_address.model import build_llava
from llava_address.trainables import component_of, is_peft

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

def _base_name(name: str) -> str:
    """Parameter name in the plain LlavaForConditionalGeneration (drops peft's wrapper prefix)."""
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def save_model_part(model, processor, out_dir: str | os.PathLike, model_args: ModelArgs,
                    trainables: TrainablesArgs, state_dict: dict[str, torch.Tensor] | None = None,
                    extra: dict[str, Any] | None = None) -> dict[str, int]:
    """Writes everything needed to rebuild the trained model from its base into `out_dir`.

    Files: `adapter_config.json` + `adapter_model.safetensors` (peft: LoRA and, if trained, the projector
    via modules_to_save) when the LLM uses LoRA; `non_lora_trainables.safetensors`, always written, with
    every trainable parameter the adapter does not hold (by its plain LLaVA name) and the projector when the
    adapter does not hold it (it may be freshly initialised even when frozen): without LoRA everything that
    trains plus the projector; with LoRA a trained tower, or a frozen projector; with LoRA and a trained
    projector only (the address_lora recipe) no tensors; `llava_args.json` (ModelArgs, TrainablesArgs,
    `extra`); `llava_config.json`; the processor.

    model: the unwrapped model (accelerator.unwrap_model). state_dict: the full state dict under ZeRO-3
    (accelerator.get_state_dict(model), keys as model.state_dict()); required when parameters are
    partitioned. Call on the main process only; wrap in clip_stage.core.fs.atomic_dir for atomicity.
    Returns {"adapter_tensors": n, "non_lora_tensors": m}.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        partitioned = [n for n, p in model.named_parameters() if p.numel() == 0]
        if partitioned:
            raise ValueError(f"parameters are partitioned (ZeRO-3?) e.g. {partitioned[:3]}: pass the gathered state_dict")
        state_dict = model.state_dict()
    counts = {"adapter_tensors": 0, "non_lora_tensors": 0}

    if is_peft(model):
        from peft import get_peft_model_state_dict

        adapter = get_peft_model_state_dict(model, state_dict=state_dict, save_embedding_layers=False)
        empty = [k for k, v in adapter.items() if v.numel() == 0]
        if not adapter or empty:
            raise ValueError(f"adapter state is empty or has empty tensors {empty[:3]} (ZeRO-3 without gathering?)")
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in adapter.items()}, str(out / ADAPTER_WEIGHTS))
        cfg = model.peft_config["default"]
        cfg = copy.copy(cfg)
        cfg.base_model_name_or_path = model_args.model_name_or_path or model_args.llm
        cfg.save_pretrained(str(out))
        counts["adapter_tensors"] = len(adapter)

    saved_in_adapter = set()
    if is_peft(model):
        saved_in_adapter = {n for n, _ in model.named_parameters() if "lora_" in n or "modules_to_save" in n}
    wanted = {}
    for name, p in model.named_parameters():
        if name in saved_in_adapter or "original_module" in name:
            continue
        if p.requires_grad or component_of(name) == "projector":
            wanted[_base_name(name)] = name
    non_lora = {}
    for base, full in wanted.items():
        if full not in state_dict:
            raise KeyError(f"{full} missing from the state dict")
        t = state_dict[full]
        if t.numel() == 0:
            raise ValueError(f"{full} is empty in the state dict (ZeRO-3 without gathering?)")
        non_lora[base] = t.detach().cpu().contiguous().clone()
    save_file(non_lora, str(out / NON_LORA_WEIGHTS))
    counts["non_lora_tensors"] = len(non_lora)

    base_model = model.get_base_model() if is_peft(model) else model
    (out / LLAVA_CONFIG_FILE).write_text(base_model.config.to_json_string())
    processor.save_pretrained(str(out))
    args = {"format": CHECKPOINT_FORMAT, "model": asdict(model_args), "trainables": asdict(trainables),
            **(extra or {})}
    (out / ARGS_FILE).write_text(json.dumps(args, indent=2) + "\n")
    return counts



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


def check_stored_models(checkpoint: str | os.PathLike, stored, skip: set[str]) -> None:
    """The models a checkpoint names as its base (not replaced by the caller) exist: a base that moved, or a path
    stored relative to the folder training ran in, is named with the options that replace it, not with the
    training flag that stored it."""
    for name in ("model_name_or_path", "llm", "vision_tower"):
        spec = getattr(stored, name)
        if spec and name not in skip:
            try:
                check_model_folder(spec, f"{checkpoint} was trained on {name}")
            except ModelPathError as e:
                raise ModelPathError(f"{e}; give that model's place (merge --base / --vision-tower; chat, infer: "
                                     "--model)") from None


def load_for_inference(base: ModelArgs | str | None, checkpoint: str | os.PathLike, **model_overrides):
    """The trained model of a checkpoint, in eval mode: (model, processor).

    base: the base model (ModelArgs, or a LLaVA hub id/path that replaces the stored one); None = the
        ModelArgs stored in the checkpoint (the vision tower swap included).
    model_overrides: ModelArgs fields to change (e.g. torch_dtype="bfloat16", load_in_4bit=False).
    Returns a peft model when the checkpoint holds a LoRA adapter (merge with `merge_and_unload`).
    """
    # Checkpoints train-llava wrote carry a manifest: a damaged file is a ManifestError naming it.
    verify_manifest(checkpoint, required=False)
    stored, _, _ = read_checkpoint_args(checkpoint)
    if base is None:
        model_args = stored
        check_stored_models(checkpoint, stored, skip=set(model_overrides))
    elif isinstance(base, str):
        model_args = dataclasses.replace(stored, model_name_or_path=base, llm=None)
        check_stored_models(checkpoint, stored, skip={"model_name_or_path", "llm", *model_overrides})
    else:
        model_args = base
    if model_overrides:
        model_args = dataclasses.replace(model_args, **model_overrides)
    model, processor = build_llava(model_args)
    ckpt = Path(checkpoint)
    if (ckpt / "processor_config.json").is_file() or (ckpt / "preprocessor_config.json").is_file():
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(ckpt))
    stored_cfg = json.loads((ckpt / LLAVA_CONFIG_FILE).read_text()) if (ckpt / LLAVA_CONFIG_FILE).is_file() else None
    if stored_cfg is not None:
        vc = stored_cfg["vision_config"]
        got = model.config.vision_config
        if (vc["hidden_size"], vc["image_size"], vc["patch_size"]) != (got.hidden_size, got.image_size, got.patch_size):
            raise ValueError(f"{checkpoint} was trained with a vision tower of hidden {vc['hidden_size']}, image "
                             f"{vc['image_size']}, patch {vc['patch_size']}; the base has {got.hidden_size}, "
                             f"{got.image_size}, {got.patch_size} (pass the tower with vision_tower=)")
    if (ckpt / NON_LORA_WEIGHTS).is_file():
        from safetensors.torch import load_file

        weights = load_file(str(ckpt / NON_LORA_WEIGHTS))
        missing_in_model = sorted(set(weights) - set(model.state_dict()))
        if missing_in_model:
            raise KeyError(f"{checkpoint}: weights for parameters the model lacks: {missing_in_model[:5]}")
        dev_dtype = {n: (p.device, p.dtype) for n, p in model.named_parameters()}
        weights = {k: v.to(*dev_dtype[k]) if k in dev_dtype else v for k, v in weights.items()}
        model.load_state_dict(weights, strict=False)
    if (ckpt / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(ckpt), is_trainable=False)
    check_processor((model.get_base_model() if is_peft(model) else model).config, processor)
    return model.eval(), processor


def load_checkpoint(path: str | os.PathLike, base=None, **model_overrides):
    """(model, processor) of a checkpoint folder in eval mode: base model + trained weights + adapter."""
    return load_for_inference(base, path, **model_overrides)  # checks the manifest when there is one
