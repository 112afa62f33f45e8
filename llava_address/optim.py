"""train-llava's optimizer side: AdamW parameter groups, the learning-rate schedule and DeepSpeed's "auto" values.

The optimizer (torch AdamW with its own projector and vision-tower learning rates) and the schedule (linear
warm-up then cosine/linear/constant) are always ours: the DeepSpeed configs in ds_configs/ have no
`optimizer` or `scheduler` section, and `fill_deepspeed_auto` refuses one and fills the "auto" values that
accelerate cannot from the model and the recipe. Used by llava_address.train's `setup`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llava_address.train_args import TrainArgs


def fill_deepspeed_auto(accelerator, model, args: TrainArgs) -> None:
    """Fills the DeepSpeed "auto" values accelerate cannot (LLaVA's config has no top-level hidden_size),
    and the clipping norm from the recipe (accelerate would otherwise put 1.0)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    text_cfg = getattr(model.config, "text_config", model.config)
    h = int(getattr(text_cfg, "hidden_size"))
    zero = ds.setdefault("zero_optimization", {})
    for key, value in {
        "reduce_bucket_size": h * h,
        "stage3_prefetch_bucket_size": int(0.9 * h * h),
        "stage3_param_persistence_threshold": 10 * h,
    }.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = float(args.max_grad_norm)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(
                f"the DeepSpeed config has a {section!r} section: it would replace the recipe's; remove it "
                "(the ds_configs/ files have none)"
            )


def param_groups(model: torch.nn.Module, args: TrainArgs) -> list[dict[str, Any]]:
    """AdamW groups: LLM/LoRA, projector and vision tower at their own learning rates; no decay on
    biases and norms. Empty groups are left out."""
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "projector" if "multi_modal_projector" in name else "vision" if "vision_tower" in name else "llm"
        decay = p.ndim >= 2 and "norm" not in name.lower()
        buckets.setdefault((part, decay), []).append(p)
    lrs = {
        "llm": args.learning_rate,
        "projector": args.projector_lr or args.learning_rate,
        "vision": args.vision_lr or args.learning_rate,
    }
    groups = []
    for part in ("llm", "projector", "vision"):
        for decay in (True, False):
            params = buckets.get((part, decay))
            if params:
                groups.append({
                    "params": params, "lr": lrs[part], "weight_decay": args.weight_decay if decay else 0.0,
                    "name": f"{part}{'' if decay else '_no_decay'}",
                })
    if not groups:
        raise ValueError("no trainable parameters")
    return groups


def make_optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.AdamW:
    """torch AdamW over `param_groups`, with the recipe's betas and epsilon."""
    return torch.optim.AdamW(
        param_groups(model, args), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )


def make_scheduler(optimizer, args: TrainArgs, total_steps: int):
    """Linear warm-up over `warmup_ratio` of the steps, then the recipe's decay (cosine, linear or constant)."""
    from transformers import get_scheduler

    warmup = math.ceil(args.warmup_ratio * total_steps)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[args.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
