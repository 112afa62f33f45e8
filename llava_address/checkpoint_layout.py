"""The on-disk contract of a LLaVA checkpoint folder: its file names, its format version, the error for a bad
one, and reading back the arguments it was trained with.

Writing and loading checkpoints is llava_address.checkpoint; this module sits below it (and below
llava_address.convert_llava, whose errors are checkpoint errors) so that neither imports the other's users.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from clip_stage.core.training import CheckpointError  # one class for both trainers
from llava_address.config import ModelArgs, TrainablesArgs

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NON_LORA_WEIGHTS = "non_lora_trainables.safetensors"
ARGS_FILE = "llava_args.json"
LLAVA_CONFIG_FILE = "llava_config.json"
CHECKPOINT_FORMAT = 1


def read_checkpoint_args(checkpoint: str | os.PathLike) -> tuple[ModelArgs, TrainablesArgs, dict[str, Any]]:
    """(ModelArgs, TrainablesArgs, the whole llava_args.json) stored in a checkpoint folder."""
    path = Path(checkpoint) / ARGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a LLaVA training checkpoint (no {ARGS_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: checkpoint format {found!r}, expected {CHECKPOINT_FORMAT}")
    parts = []
    for section, cls in (("model", ModelArgs), ("trainables", TrainablesArgs)):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data.get(section, {})) - known)
        if unknown:  # written by another version of address-llava: say so instead of a TypeError
            raise CheckpointError(f"{path}: {section} field(s) {unknown} are not this version's; the checkpoint was "
                                  f"written by another version of address-llava")
        parts.append(cls(**data[section]))
    return parts[0], parts[1], data
