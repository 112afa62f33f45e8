"""Typed configuration of AddressCLIP training, grouped by concern (model, data, loss, optimisation, run).

Each field's docstring becomes its `--help` text; `parse_config` reads flags (`--field-name`) over an
optional YAML/JSON file (`--config recipe.yaml`) into the frozen `TrainConfig`, by the rules of
`clip_stage.core.config`. Checks live in `__post_init__`; never
mutate a parsed config: derive with `dataclasses.replace`.

Field names are train-llava's for every concept the two trainers share (HF Trainer's words:
`--learning-rate`, `--max-grad-norm`, `--per-device-batch-size`, `--num-epochs`, `--save-total-limit`,
`--resume PATH|latest`, `--stop-at-step`, ...; see clip_stage.core.training for the run-folder layout).

Defaults are the paper's recipe (OpenAI CLIP ViT-B/16, AdamW lr 2.4e-5 -> 2.4e-8 cosine, betas
0.9/0.98, wd 0.2, batch 32 per device, 100 epochs, loss weights 1 / 0.2 / 0.8).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from clip_stage.core.config import ALIASES, ConfigParser, Section
from clip_stage.core.trackers import parse_report_to

PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass(frozen=True)
class ModelArgs:
    """Which CLIP to fine-tune."""

    model: str = "ViT-B-16"
    """open_clip architecture name (see `list_clip_models()`; ours: addressclip-tiny, addressclip-small)."""
    pretrained: str | None = "openai"
    """open_clip pretrained tag, weights file, or a train-clip checkpoint folder; 'none' for random init."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (open_clip set_grad_checkpointing): less memory, slower."""
    mixed_precision: str = "auto"
    """Mixed precision: auto (bf16 on a GPU that supports it, else no), no (fp32), bf16, fp16 (CUDA only)."""

    def __post_init__(self):
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision {self.mixed_precision!r}; valid: {PRECISIONS}")
        if self.pretrained is not None and self.pretrained.lower() == "none":
            object.__setattr__(self, "pretrained", None)


@dataclass(frozen=True)
class DataArgs:
    """The image-address dataset (clip_stage.core.schema layout) and how it is turned into text."""

    dataset: str = ""
    """Dataset folder (records.parquet + images/)."""
    split: str = "train"
    """Split to train on."""
    holdout_fold: str = ""
    """'k/n': train on the split minus its k-th of n folds (folds by a hash of image_id; k in 1..n): the fold models of cross-fitted candidates."""
    address_style: str = "full"
    """Address text style (clip_stage.core.schema.ADDRESS_STYLES: full, canonical, street, sub_street, neighbourhood, intersection)."""
    semantic_template: str = "{caption}. {address}"
    """Text of the semantic term: caption first, address appended."""
    augment: bool = True
    """Use open_clip's training augmentation (random resized crop); else the deterministic val transform."""
    num_workers: int = 2
    """DataLoader worker processes (0: load in the training process)."""

    def __post_init__(self):
        if not self.dataset:
            raise ValueError("--dataset is required (a dataset folder written by build-dataset / demo-city)")
        if "{caption}" not in self.semantic_template or "{address}" not in self.semantic_template:
            raise ValueError("--semantic-template must contain {caption} and {address}")
        if self.num_workers < 0:
            raise ValueError("--num-workers must be >= 0")
        if self.holdout_fold:
            from clip_stage.train_data import parse_fold  # lazy: reading a config imports no torch

            parse_fold(self.holdout_fold)


@dataclass(frozen=True)
class LossArgs:
    """total = a * address + b * semantic + c * geo."""

    address_weight: float = 1.0
    """a: image-address contrastive weight."""
    semantic_weight: float = 0.2
    """b: image-"caption + address" contrastive weight (needs a filled caption column)."""
    geo_weight: float | None = None
    """c: image-geography matching weight. Unset: 0.8 if the dataset has coordinates, else off with a warning; an explicit value > 0 without coordinates is an error."""
    geo_target: str = "linear"
    """Distance -> target similarity mapping (clip_stage.losses.GEO_TARGETS: linear 1-D/2, exp exp(-D/tau), signed 1-D)."""
    geo_tau: float = 0.5
    """Scale of the 'exp' geo target."""
    gather_with_grad: bool = False
    """Back-propagate through all ranks' gathered features (default: local shard only, as open_clip)."""

    def __post_init__(self):
        from clip_stage.losses import geo_target_fn  # lazy: reading a config imports no torch

        geo_target_fn(self.geo_target)
        for name in ("address_weight", "semantic_weight", "geo_weight"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")


DEFAULT_GEO_WEIGHT = 0.8


@dataclass(frozen=True)
class OptimArgs:
    """AdamW with linear warm-up and a cosine decay."""

    learning_rate: float = 2.4e-5
    """Peak learning rate."""
    min_lr: float = 2.4e-8
    """Final learning rate of the cosine schedule."""
    warmup_steps: int | None = None
    """Linear warm-up steps (unset: 2% of the total steps)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.98
    """AdamW beta2."""
    adam_epsilon: float = 1e-6
    """AdamW epsilon."""
    weight_decay: float = 0.2
    """Decoupled weight decay (not applied to gains, biases and the logit scale)."""
    per_device_batch_size: int = 32
    """Images per process per step (global batch = per_device_batch_size x processes)."""
    num_epochs: int = 100
    """Passes over the training split."""
    max_steps: int | None = None
    """Cap on total optimiser steps (the schedule is planned over this many)."""
    max_grad_norm: float | None = None
    """Clip the gradient norm to this value (unset or 0: no clipping)."""
    seed: int = 0
    """Seed of initialisation, data order and augmentation."""

    def __post_init__(self):
        if self.per_device_batch_size < 1 or self.num_epochs < 1:
            raise ValueError("--per-device-batch-size and --num-epochs must be >= 1")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError("need 0 <= --min-lr <= --learning-rate")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError("--max-grad-norm must be >= 0")


@dataclass(frozen=True)
class RunArgs:
    """Outputs, checkpoints, logging."""

    output_dir: str = field(default="runs/addressclip", metadata={ALIASES: ("out",)})
    """Run folder (also --out, as every other command's output): checkpoint-NNNNNN/, final/, tensorboard/ (and wandb/, mlruns/ when asked), metrics.jsonl, run_summary.json."""
    save_every: int = 1000
    """Write a checkpoint every N steps (and always at the end)."""
    save_total_limit: int | None = 2
    """Keep only the newest this many step checkpoints (unset: keep all)."""
    resume: str | None = None
    """'latest': continue from the newest intact checkpoint in output_dir (fresh start if none); or a checkpoint folder."""
    stop_at_step: int | None = None
    """Checkpoint and exit once this global step is reached, without changing the schedule (time-sliced jobs)."""
    log_every: int = 10
    """Steps between log lines / tracker points."""
    report_to: tuple[str, ...] = ("tensorboard",)
    """Trackers, a comma list or the flag repeated: tensorboard (output_dir/tensorboard), wandb (offline under output_dir/wandb unless WANDB_MODE is set), mlflow (file store output_dir/mlruns unless MLFLOW_TRACKING_URI is set), or none."""
    progress_bar: bool = True
    """Show a tqdm progress bar (rank 0)."""
    num_threads: int | None = None
    """torch CPU threads per process (unset: torch's / accelerate's default)."""

    def __post_init__(self):
        object.__setattr__(self, "report_to", parse_report_to(self.report_to))
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError("--save-total-limit must be >= 1")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ValueError("--stop-at-step must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=lambda: DataArgs(dataset="-"))
    loss: LossArgs = field(default_factory=LossArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    run: RunArgs = field(default_factory=RunArgs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return cls(**{g: GROUPS[g](**d.get(g, {})) for g in GROUPS})


GROUPS: dict[str, type] = {"model": ModelArgs, "data": DataArgs, "loss": LossArgs, "optim": OptimArgs, "run": RunArgs}


# --- flags and config file (clip_stage.core.config) -----------------------------------------------

def build_parser(prog: str = "train-clip", description: str | None = None) -> ConfigParser:
    """train-clip's parser: `--config FILE` and one flag per field (`--learning-rate`, also `--optim.learning-rate`)."""
    return ConfigParser([Section(name, cls) for name, cls in GROUPS.items()], prog=prog, description=description)


def parse_config(argv: list[str] | None = None, prog: str = "train-clip", description: str | None = None) -> TrainConfig:
    return TrainConfig(**build_parser(prog, description).parse_config(argv).sections)
