"""Training options of `train-llava` (TrainArgs), its shipped recipes, its parser, and which settings a
`--resume` may change (`resume_mismatches`).

A run is described by four dataclasses, one per concern: ModelArgs, TrainablesArgs and DataArgs
(llava_address.config) and TrainArgs (here). A YAML recipe with the sections `model:`, `trainables:`,
`data:` and `train:` stands in for flags; flags given on the command line override it. Parsing follows
the rules of every command (clip_stage.core.config): a field is `--field-name` or `--section.field-name`
(only the latter where two sections share the name, e.g. `--model.vision-tower`), `_` and `-` are the same
(`--model_name_or_path`), and a boolean takes an optional value as LLaVA's scripts write it
(`--gradient_checkpointing True`, `--no-gradient-checkpointing`).

    train-llava --config address_lora --data-path convs.json --output-dir runs/lora
    train-llava --config path/to/my_recipe.yaml --learning-rate 1e-4
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from clip_stage.core.config import ALIASES, ConfigParser, FieldKind, Section
from clip_stage.core.trackers import parse_report_to

RECIPE_DIR = Path(__file__).with_name("recipes")


class BatchSizeError(ValueError):
    """A global batch the processes cannot split evenly (a user error: one line, exit 2)."""


@dataclass(frozen=True)
class TrainArgs:
    """Optimisation, schedule, precision, logging and checkpointing of one training run."""

    output_dir: str = dataclasses.field(default="runs/llava", metadata={ALIASES: ("out",)})
    """also --out, as every other command's output: folder for checkpoints (checkpoint-<step>/), TensorBoard logs (tensorboard/), wandb/ and mlruns/ when asked, and metrics.jsonl"""
    learning_rate: float = 2e-4
    """peak learning rate of the LLM / LoRA parameter group"""
    projector_lr: float | None = None
    """peak learning rate of the projector parameter group (default: learning_rate)"""
    vision_lr: float | None = None
    """peak learning rate of the vision tower group when it trains (default: learning_rate)"""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)"""
    adam_beta1: float = 0.9
    """AdamW beta1"""
    adam_beta2: float = 0.999
    """AdamW beta2"""
    adam_epsilon: float = 1e-8
    """AdamW epsilon"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """learning-rate schedule after the linear warm-up"""
    warmup_ratio: float = 0.03
    """fraction of the optimizer steps spent in linear warm-up"""
    num_epochs: int = 1
    """passes over the data"""
    max_steps: int | None = None
    """total optimizer steps; overrides num_epochs (the schedule spans exactly these steps)"""
    per_device_batch_size: int = 16
    """samples per process per micro-step"""
    global_batch_size: int | None = None
    """samples per optimizer step over all processes; gradient accumulation is derived from it"""
    gradient_accumulation_steps: int | None = None
    """micro-steps per optimizer step (give this or global_batch_size, not both; default 1)"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (0 disables); also fills DeepSpeed's "auto" gradient_clipping"""
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    """autocast precision; default: what `accelerate launch` was given (else no)"""
    gradient_checkpointing: bool = False
    """recompute LLM activations in the backward pass (less memory, about 30% more compute)"""
    seed: int = 42
    """seed of model initialisation of new parts, data order and dropout"""
    save_every: int = 0
    """write a checkpoint every this many optimizer steps (0: only at the end); the last step always saves"""
    save_total_limit: int | None = None
    """keep only the newest this many step checkpoints (default: keep all)"""
    log_every: int = 1
    """log loss, lr, tokens/s and memory every this many optimizer steps"""
    init_from: str | None = None
    """checkpoint folder whose non-LoRA weights (e.g. the aligned projector) start this run (LLaVA's --pretrain_mm_mlp_adapter)"""
    resume: str | None = None
    """checkpoint folder to resume from, or 'latest' for the newest one in output_dir"""
    trust_checkpoint: bool = False
    """allow a DeepSpeed --resume from outside output_dir (DeepSpeed unpickles its shards: only your own)"""
    stop_at_step: int | None = None
    """checkpoint and exit once this optimizer step is reached, without changing the schedule (time-sliced jobs)"""
    num_workers: int = 0
    """DataLoader worker processes"""
    report_to: tuple[str, ...] = ("tensorboard",)
    """trackers besides metrics.jsonl, a comma list or the flag repeated: tensorboard (output_dir/tensorboard), wandb (offline under output_dir/wandb unless WANDB_MODE is set), mlflow (file store output_dir/mlruns unless MLFLOW_TRACKING_URI is set), or none"""
    progress_bar: bool = True
    """show a tqdm progress bar on rank 0"""

    def __post_init__(self) -> None:
        # a string (older checkpoints' configs, Python callers) or a list of comma lists -> checked names
        object.__setattr__(self, "report_to", parse_report_to(self.report_to))
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("projector_lr", "vision_lr"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {self.num_epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.per_device_batch_size < 1:
            raise ValueError(f"per_device_batch_size must be >= 1, got {self.per_device_batch_size}")
        if self.global_batch_size is not None and self.gradient_accumulation_steps is not None:
            raise ValueError("give global_batch_size or gradient_accumulation_steps, not both")
        if self.global_batch_size is not None and self.global_batch_size < self.per_device_batch_size:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} < per_device_batch_size {self.per_device_batch_size}"
            )
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.save_every < 0 or self.log_every < 1:
            raise ValueError("save_every must be >= 0 and log_every >= 1")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1, got {self.save_total_limit}")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ValueError(f"stop_at_step must be >= 1, got {self.stop_at_step}")

    def accumulation_for(self, world_size: int) -> int:
        """Micro-steps per optimizer step on `world_size` processes (exact: a global batch must divide)."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps or 1
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size % per_step:
            raise BatchSizeError(
                f"global_batch_size {self.global_batch_size} is not a multiple of per_device_batch_size "
                f"{self.per_device_batch_size} x {world_size} processes"
            )
        return self.global_batch_size // per_step

    def total_steps(self, micro_batches_per_epoch: int, accumulation: int) -> int:
        """Optimizer steps of the whole run (the length of the lr schedule)."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(micro_batches_per_epoch / accumulation)) * self.num_epochs


# --------------------------------------------------------------------------------------------
# what a resumed run may change
# --------------------------------------------------------------------------------------------

# Settings a resumed run may change: where and how it reports and saves, how fast it runs (attention kernel,
# activation recompute, placement, workers, the length cache), and resuming itself. Everything else of the
# four sections changes the result and must equal the checkpoint's. The batch split (global batch or
# accumulation) is checked as the processes x accumulation it gives, the length (epochs, max steps) as the
# total optimizer steps it gives: the same run spelled another way is the same run.
RESUME_FREE = frozenset({
    ("model", "attn_implementation"), ("model", "device_map"), ("data", "length_cache_dir"),
    ("train", "output_dir"), ("train", "save_every"), ("train", "save_total_limit"), ("train", "log_every"),
    ("train", "resume"), ("train", "trust_checkpoint"), ("train", "stop_at_step"), ("train", "num_workers"),
    ("train", "report_to"), ("train", "progress_bar"), ("train", "gradient_checkpointing"),
    ("train", "global_batch_size"), ("train", "gradient_accumulation_steps"),
})
RESUME_LENGTH = (("train", "max_steps"), ("train", "num_epochs"))
RESUME_PATHS = frozenset({("model", "model_name_or_path"), ("model", "llm"), ("model", "vision_tower"),
                          ("data", "data_path"), ("data", "image_root"), ("train", "init_from")})


def _same_path(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and \
        os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _image_root(data: dict[str, Any]) -> Any:
    """The folder the images are read from: image_root, or by default the data file's folder."""
    if data.get("image_root") is None and isinstance(data.get("data_path"), str):
        return str(Path(data["data_path"]).parent)
    return data.get("image_root")


def resume_mismatches(saved: dict[str, Any], now: dict[str, Any], total_steps: tuple[int, int] | None = None
                      ) -> list[str]:
    """'section.field: was X, now Y' for every result-changing setting in which `now` differs from `saved`.

    saved / now: {"model", "trainables", "data", "train": {field: value}} as a checkpoint's llava_args.json and
    `RunConfig.to_json` hold them; a field `saved` does not record (an older version's checkpoint) is not
    compared. total_steps: (recorded, now) optimizer steps of the whole run; given, epochs and max steps count
    only when these differ (None: they are compared as they are spelled).
    """
    out = []
    length_differs = total_steps is not None and total_steps[0] != total_steps[1]
    for section in ("model", "trainables", "data", "train"):
        was_s, now_s = saved.get(section) or {}, now.get(section) or {}
        for name, value in now_s.items():
            key = (section, name)
            if key in RESUME_FREE or name not in was_s or (key in RESUME_LENGTH and total_steps is not None
                                                           and not length_differs):
                continue
            was = was_s[name]
            if key == ("data", "image_root"):
                was, value = _image_root(was_s), _image_root(now_s)
            if isinstance(was, list):
                was = tuple(was)  # JSON has no tuples
            if isinstance(value, list):
                value = tuple(value)
            if was == value or (key in RESUME_PATHS and _same_path(was, value)):
                continue  # equal, or the same file spelled another way
            out.append(f"{section}.{name}: was {was!r}, now {value!r}")
    if length_differs:  # after the epochs or max steps that make it, or alone (the data changed)
        out.append(f"total optimizer steps: was {total_steps[0]}, now {total_steps[1]}")
    return out


# --------------------------------------------------------------------------------------------
# dataclasses <-> flags and YAML
# --------------------------------------------------------------------------------------------


def list_recipes() -> list[str]:
    """Names of the recipes shipped in llava_address/recipes/."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def build_parser(sections: list[Section], prog: str = "train-llava", description: str | None = None) -> ConfigParser:
    """train-llava's parser: `--config NAME|FILE` and one flag per field of every section (clip_stage.core.config)."""
    return ConfigParser(sections, prog=prog, description=description, named_configs=RECIPE_DIR)


def to_plain(obj: Any) -> Any:
    """A dataclass instance as JSON-friendly dicts/lists (for checkpoints and logs)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def from_plain(cls: type, data: dict[str, Any]) -> Any:
    """Rebuilds a dataclass written by `to_plain`, ignoring fields a newer/older version does not have."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            continue
        kwargs[k] = FieldKind.of(hints[k]).finish(v)
    return cls(**kwargs)
