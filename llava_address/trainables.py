"""Choose what trains in a LLaVA model: vision tower / projector / LLM each frozen, full or (LLM) LoRA.

`apply_trainables(model, TrainablesArgs)` freezes and unfreezes each component and adds LoRA, whose targets
are selected by a regex on full module paths inside the language model; `trainable_summary` counts what
trains per component, and the result is checked against the request.
"""

from __future__ import annotations

import logging
import re

from torch import nn

from llava_address.config import TrainablesArgs

log = logging.getLogger(__name__)

COMPONENTS = ("vision_tower", "projector", "llm", "lora")


def component_of(param_name: str) -> str:
    """Which component a parameter belongs to: vision_tower, projector, llm, lora (adapter weights) or other."""
    if "lora_" in param_name:
        return "lora"
    if "vision_tower" in param_name:
        return "vision_tower"
    if "multi_modal_projector" in param_name:
        return "projector"
    if "language_model" in param_name or "lm_head" in param_name:
        return "llm"
    return "other"


def trainable_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """{component: {"trainable": n, "total": m}} in parameters (a 4-bit tensor counts its packed elements)."""
    out = {c: {"trainable": 0, "total": 0} for c in COMPONENTS}
    for name, p in model.named_parameters():
        c = out.setdefault(component_of(name), {"trainable": 0, "total": 0})
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3 partitions report 0 numel
        c["total"] += n
        if p.requires_grad:
            c["trainable"] += n
    out["all"] = {k: sum(v[k] for c, v in out.items() if c != "all") for k in ("trainable", "total")}
    return out


def format_summary(summary: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{c} {v['trainable']:,}/{v['total']:,}" for c, v in summary.items() if v["total"])


def lora_target_names(model: nn.Module, regex: str) -> list[str]:
    """Module paths fully matched by `regex`; an error unless all are Linear layers inside the language model."""
    pattern = re.compile(regex)
    names = [n for n, m in model.named_modules() if n and pattern.fullmatch(n)]
    if not names:
        raise ValueError(f"LoRA target regex {regex!r} matches no module")
    outside = [n for n in names if ".language_model." not in f".{n}."]
    if outside:
        raise ValueError(f"LoRA target regex {regex!r} matches modules outside the language model: {outside[:5]}")
    modules = dict(model.named_modules())
    not_linear = [n for n in names if not isinstance(modules[n], nn.Linear) and "Linear" not in type(modules[n]).__name__]
    if not_linear:
        raise ValueError(f"LoRA target regex {regex!r} matches non-Linear modules: {not_linear[:5]}")
    return names


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_loaded_in_8bit", False))


def apply_trainables(model: nn.Module, args: TrainablesArgs):
    """Freezes/unfreezes each component and adds LoRA; returns (model, summary).

    The returned model is a peft `PeftModelForCausalLM` when `args.llm == "lora"` (projector in
    `modules_to_save` when it trains), the same model otherwise. The summary is `trainable_summary(model)`;
    it is checked against `args` (an error if, e.g., LoRA selected nothing).
    """
    quantized = is_quantized(model)
    if quantized and args.llm == "full":
        raise ValueError("a quantised LLM cannot be fully fine-tuned: use --train-llm lora (QLoRA) or load unquantised")
    if quantized:
        from peft import prepare_model_for_kbit_training

        # Casts the non-quantised weights (norms, tower, projector) to fp32 for stable QLoRA training;
        # gradient checkpointing is the training loop's choice.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.requires_grad_(False)
    if args.llm == "lora":
        from peft import LoraConfig, get_peft_model

        lora_target_names(model, args.lora_target_regex)
        lora = LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
            target_modules=args.lora_target_regex, task_type="CAUSAL_LM",
            modules_to_save=["multi_modal_projector"] if args.projector == "full" else None,
        )
        model = get_peft_model(model, lora)
    else:
        if args.llm == "full":
            for name, p in model.named_parameters():
                if component_of(name) == "llm":
                    p.requires_grad_(True)
        if args.projector == "full":
            model.model.multi_modal_projector.requires_grad_(True)
    if args.vision_tower == "full":
        for name, p in model.named_parameters():
            if component_of(name) == "vision_tower":
                p.requires_grad_(True)
    summary = trainable_summary(model)
    expect = {"vision_tower": args.vision_tower == "full", "projector": args.projector == "full",
              "llm": args.llm == "full", "lora": args.llm == "lora"}
    wrong = [c for c, on in expect.items() if bool(summary[c]["trainable"]) != on]
    if wrong:
        raise RuntimeError(f"trainable parameters disagree with {args} for {wrong}: {format_summary(summary)}")
    log.info("trainable parameters: %s", format_summary(summary))
    return model, summary


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")
