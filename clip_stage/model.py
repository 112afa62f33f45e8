"""CLIP models for AddressCLIP: creation by name, and the self-describing checkpoint folders train-clip writes.

Any open_clip architecture can be used by name (`ViT-B-16`, `hf-hub:...`, `local-dir:...`) with a
pretrained tag or a local weights file. Our own tiny shapes for tests and the demo are data, not code:
JSON files in `clip_stage/model_configs/` registered once with `open_clip.add_model_config`
(`addressclip-tiny`: ViT width 64, 2 layers, patch 8, 32 px; `addressclip-small`: width 128, 4 layers,
64 px). Adding an architecture is adding a file.

Checkpoint folder (written atomically by `save_checkpoint`, read by `load_checkpoint`):

    <run>/checkpoint-000123/
        model.safetensors     the open_clip state dict
        clip_config.json      {"model_name", "pretrained", "model_config" (open_clip's dict),
                               "train_config" (our TrainConfig as a dict), "step", "epoch", "format"}
        training_state.pt     optimizer, scheduler, step, epoch, RNG, data position
                              (tensors and primitives only: loads with torch.load(weights_only=True))
        manifest.json         size + sha256 of every file (checked on load; fsynced before the rename)
    <run>/final/              the same layout (without training_state.pt) at the end of training

Step folders are named, rotated and resumed as train-llava's are (clip_stage.core.training).
`load_checkpoint` accepts a step folder, a `final/` folder or a run folder (final/ first, else the newest
complete step folder).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from clip_stage.core.fs import ManifestError, atomic_dir, load_error_text, verify_manifest
from clip_stage.core.registry import UnknownNameError
from clip_stage.core.training import CHECKPOINT_RE, CheckpointError, list_checkpoints

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "clip_config.json"
STATE_FILE = "training_state.pt"
CHECKPOINT_FORMAT = 1

_registered = False


class UnknownModelError(UnknownNameError):
    """An architecture name or pretrained tag open_clip does not know (a KeyError for callers that catch one;
    a project ValueError, so every command prints it as one line)."""


@dataclass
class ClipBundle:
    """An open_clip model with everything needed to feed it."""

    model: torch.nn.Module
    """open_clip model created with output_dict=True (forward returns image_features, text_features, logit_scale)."""
    preprocess_train: Callable
    """PIL image -> tensor, with open_clip's training augmentation."""
    preprocess_val: Callable
    """PIL image -> tensor, deterministic."""
    tokenizer: Callable
    """list[str] -> LongTensor [N, context_length]."""
    model_name: str
    pretrained: str | None

    @property
    def model_config(self) -> dict:
        return model_config(self.model_name)

    @property
    def image_size(self) -> int:
        size = self.model_config["vision_cfg"]["image_size"]
        return int(size if isinstance(size, int) else size[0])


def _open_clip():
    import open_clip

    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True
    return open_clip


def list_clip_models() -> list[str]:
    """Every architecture name create_clip accepts without a schema prefix (open_clip's + ours)."""
    return list(_open_clip().list_models())


def list_local_models() -> list[str]:
    """Our own architectures (the JSON files in clip_stage/model_configs/)."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def model_config(model_name: str) -> dict:
    """open_clip's architecture dict for `model_name`; unknown names raise UnknownModelError."""
    cfg = _open_clip().get_model_config(model_name)
    if cfg is None:
        # Short on purpose: open_clip knows well over a hundred names, and this message is one line on stderr.
        known = list_clip_models()
        close = difflib.get_close_matches(model_name, known, n=3)
        raise UnknownModelError(
            f"unknown CLIP architecture {model_name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
            + f"; ours: {', '.join(list_local_models())}; or one of open_clip's {len(known)} (open_clip.list_models(), "
            "e.g. ViT-B-16), 'hf-hub:org/repo', 'local-dir:/path'")
    return cfg


def check_pretrained(model_name: str, pretrained: str | None) -> None:
    """Refuses a `pretrained` that is neither on disk nor one of open_clip's tags for `model_name` (before loading
    anything: open_clip would raise a bare RuntimeError)."""
    if pretrained is None or pretrained.strip().lower() in ("", "none") or os.path.exists(pretrained):
        return
    if ":" in model_name:  # hf-hub: / local-dir: models bring their own weights
        return
    model_config(model_name)
    tags = _open_clip().list_pretrained_tags_by_model(model_name)
    if pretrained.lower() not in {t.lower() for t in tags}:
        raise UnknownModelError(f"--pretrained {pretrained!r}: no such file, nor a pretrained tag of {model_name} "
                                f"(tags: {', '.join(tags) or 'none; use a weights file or none'})")


def check_model_source(args) -> None:
    """What `add_model_source_args`' options name exists (architecture, tag or file, checkpoint folder), checked
    without loading a model; `bundle_from_args` loads it."""
    if args.checkpoint:
        _resolve_checkpoint_dir(args.checkpoint)
    else:
        if ":" not in args.model:
            model_config(args.model)
        check_pretrained(args.model, args.pretrained)


def checkpoint_folders(path: str | Path) -> tuple[list[Path], Path | None]:
    """For an output check: the checkpoint folders `--checkpoint path` names or sits among (an output written
    inside one would break its manifest), and the train-clip run folder holding them, if any (an output may
    sit there, beside them). Incomplete folders count too; nothing is read or verified."""
    def steps(run: Path) -> list[Path]:
        return sorted(c for c in run.glob("checkpoint-*") if CHECKPOINT_RE.match(c.name) and c.is_dir())

    p = Path(path)
    is_checkpoint = (p / CONFIG_FILE).exists() or p.name == "final" or CHECKPOINT_RE.match(p.name) is not None
    run: Path | None = p
    if is_checkpoint:
        run = p.parent if (p.parent / "final").is_dir() or steps(p.parent) else None
    folders = [p] if is_checkpoint else []
    if run is not None:
        folders += [run / "final", *steps(run)]
    return list(dict.fromkeys(folders)), run


_PICKLE_GARBAGE = ("invalid load key", "Unsupported operand", "truncated", "could not find MARK", "stack underflow")


def weights_error_text(e: BaseException) -> str:
    """One line for why open_clip could not load a weights file (torch's messages span many lines and list
    every missing key)."""
    import pickle

    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and any(g in text for g in _PICKLE_GARBAGE):
        return "not a PyTorch or safetensors weights file"
    if "Error(s) in loading state_dict" in text:
        parts = []
        for label, what in (("Missing key(s)", "missing"), ("Unexpected key(s)", "unexpected")):
            line = next((ln for ln in text.splitlines() if label in ln), "")
            keys = re.findall(r'"([^"]+)"', line)
            if keys:
                parts.append(f"{len(keys)} {what} (e.g. {keys[0]})")
        shapes = re.findall(r"size mismatch for ([^:]+):", text)
        if shapes:
            parts.append(f"{len(shapes)} tensors of another shape (e.g. {shapes[0]})")
        return "weights do not fit the architecture: " + ("; ".join(parts) or "state dict mismatch")
    return load_error_text(e)


def _is_checkpoint_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / CONFIG_FILE).exists() or (p / "final").is_dir() or bool(list_checkpoints(p)))


def create_clip(
    model_name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    **open_clip_kwargs: Any,
) -> ClipBundle:
    """Creates an open_clip model, its transforms and tokenizer.

    `pretrained` is an open_clip tag (`openai`, `laion2b_s34b_b88k`, ...), a weights file, a checkpoint
    folder written by train-clip (its architecture must equal `model_name`), or None / "none" (random init).
    """
    open_clip = _open_clip()
    if pretrained is not None and pretrained.strip().lower() in ("", "none"):
        pretrained = None
    if ":" not in model_name:
        model_config(model_name)  # clear error for unknown names
    check_pretrained(model_name, pretrained)
    if pretrained is not None and _is_checkpoint_dir(pretrained):
        bundle = load_checkpoint(pretrained, device=device, model_name=model_name)
        return bundle
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, precision=precision, output_dict=True, **open_clip_kwargs
        )
    except Exception as e:
        if pretrained is None or not os.path.exists(pretrained):
            raise
        # A user's weights file that open_clip cannot read or fit (a pickle stays refused: weights_only loading).
        raise CheckpointError(f"{pretrained}: cannot be loaded as {model_name} weights: {weights_error_text(e)}") from e
    tokenizer = open_clip.get_tokenizer(model_name)
    return ClipBundle(model, preprocess_train, preprocess_val, tokenizer, model_name, pretrained)


def add_model_source_args(parser, model_help: str) -> None:
    """`--checkpoint RUN | --model NAME [--pretrained TAG]`: the model a command reads (eval-clip, export-clip)."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="train-clip run folder or checkpoint folder (model.safetensors + clip_config.json)")
    src.add_argument("--model", help=f"open_clip architecture name: {model_help}")
    parser.add_argument("--pretrained", default=None, help="with --model: open_clip pretrained tag or weights file")


def bundle_from_args(args, device: str | torch.device = "cpu") -> ClipBundle:
    """The model `add_model_source_args`' options name (`check_model_source` checks it without loading)."""
    if args.checkpoint:
        return load_checkpoint(args.checkpoint, device=device)
    return create_clip(args.model, pretrained=args.pretrained, device=device)


def _resolve_checkpoint_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint folder")
    if (p / CONFIG_FILE).exists():
        return p
    if (p / "final" / CONFIG_FILE).exists():
        return p / "final"
    latest = latest_checkpoint(p)
    if latest is not None:
        return latest
    raise CheckpointError(f"{p}: neither a checkpoint folder ({CONFIG_FILE} missing) nor a run folder with final/ or "
                          "checkpoint-NNNNNN/")


def read_checkpoint_config(path: str | Path) -> dict:
    """The clip_config.json of a checkpoint (step folder, final/ or run folder)."""
    d = _resolve_checkpoint_dir(path)
    return json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", model_name: str | None = None
) -> ClipBundle:
    """Loads a checkpoint written by train-clip. With `model_name`, a different architecture is an error."""
    d = _resolve_checkpoint_dir(path)
    verify_checkpoint(d, required=False)
    cfg = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
    saved_name = cfg["model_name"]
    if model_name is not None and model_name != saved_name and model_config(model_name) != cfg.get("model_config"):
        raise CheckpointError(
            f"{d} holds a {saved_name!r} model, not {model_name!r} "
            f"(use --model {saved_name} or a checkpoint of {model_name})"
        )
    open_clip = _open_clip()
    name = saved_name
    if ":" not in saved_name and open_clip.get_model_config(saved_name) is None:
        raise CheckpointError(f"{d}: architecture {saved_name!r} is not registered here; known: {list_local_models()}")
    # open_clip warns "initialized randomly" for pretrained=None; the weights are loaded right after.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=None, device=device, output_dict=True
        )
    finally:
        root.setLevel(level)
    _load_weights_strict(model, d / WEIGHTS_FILE, d)
    model.to(device)
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBundle(model, preprocess_train, preprocess_val, tokenizer, name, str(d))


def verify_checkpoint(path: str | Path, required: bool = True) -> None:
    """Checks a checkpoint folder against its manifest.json (CheckpointError naming the bad file).
    required=False accepts folders without a manifest (written before manifests existed)."""
    try:
        verify_manifest(path, required=required)
    except ManifestError as e:
        raise CheckpointError(str(e)) from None


def _load_weights_strict(model: torch.nn.Module, weights: Path, where: Path) -> None:
    from safetensors.torch import load_file

    if not weights.exists():
        raise CheckpointError(f"{where}: {WEIGHTS_FILE} missing (incomplete checkpoint?)")
    try:
        state = load_file(str(weights))
    except Exception as e:  # truncated or not safetensors (a folder without a manifest is not verified first)
        raise CheckpointError(f"{weights}: cannot be read: {load_error_text(e)}") from e
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} tensors of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"{where}: weights do not fit the architecture: " + "; ".join(detail))
    model.load_state_dict(state, strict=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP / accelerate / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    model_name: str,
    pretrained: str | None,
    train_config: dict | None = None,
    training_state: dict | None = None,
    step: int | None = None,
    epoch: int | None = None,
) -> Path:
    """Writes one checkpoint folder atomically (weights, config, optional training state)."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    cfg = {
        "format": CHECKPOINT_FORMAT,
        "model_name": model_name,
        "pretrained": pretrained,
        "model_config": model_config(model_name),
        "train_config": train_config or {},
        "step": step,
        "epoch": epoch,
    }
    with atomic_dir(path, verified=True) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, default=str) + "\n", encoding="utf-8")
        if training_state is not None:
            torch.save(training_state, tmp / STATE_FILE)
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete step folder of a run folder (not verified), or None."""
    steps = step_checkpoints(run_dir)
    return steps[-1] if steps else None


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The step folders of a run folder that have weights and config, oldest first (not verified)."""
    return list_checkpoints(run_dir, lambda p: (p / CONFIG_FILE).exists() and (p / WEIGHTS_FILE).exists())
