"""Build LLaVA-1.5 (HF `LlavaForConditionalGeneration` + processor), swap in a vision tower, choose what trains,
save/load training checkpoints.

- `build_llava(ModelArgs)`: a HF LLaVA checkpoint by hub id or path (e.g. `llava-hf/llava-1.5-7b-hf`), with
  dtype, attention kernel, 4/8-bit bitsandbytes quantisation (QLoRA) and device_map; or a LLaVA composed
  from a Vicuna/Llama LLM, a CLIP vision tower and a fresh `mlp2x_gelu` projector (LLaVA-1.5 defaults:
  feature layer -2, CLS dropped). `ModelArgs.vision_tower` swaps a `CLIPVisionModel` folder (the AddressCLIP
  export) into the model; when its width or patch grid differs, the projector is re-initialised and the
  image-token count and processor (size, mean/std) follow the new tower.
- `apply_trainables(model, TrainablesArgs)`: vision tower / projector / LLM each frozen, full or (LLM) LoRA;
  LoRA targets are selected by a regex on full module paths inside the language model.
- `save_checkpoint` / `load_for_inference`: the checkpoint layout shared by training, `merge` and chat.

Module paths (transformers 5): `model.vision_tower` (CLIPVisionModel), `model.multi_modal_projector`,
`model.language_model` (LlamaModel), `lm_head`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clip_stage.core.config import asdict
from llava_address.config import ModelArgs, TrainablesArgs

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"

# Checkpoint layout (one folder per checkpoint; see save_checkpoint).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NON_LORA_WEIGHTS = "non_lora_trainables.safetensors"
ARGS_FILE = "llava_args.json"
LLAVA_CONFIG_FILE = "llava_config.json"
CHECKPOINT_FORMAT = 1

COMPONENTS = ("vision_tower", "projector", "llm", "lora")


# --- image tokens and processor consistency ----------------------------------------------------------

def num_image_tokens(config) -> int:
    """Image-token ids per image = visual features the projector yields (patches, + CLS if strategy 'full')."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + (1 if config.vision_feature_select_strategy == "full" else 0)


def _crop_hw(image_processor) -> tuple[int, int]:
    crop = getattr(image_processor, "crop_size", None)
    if crop is not None and getattr(image_processor, "do_center_crop", True):
        return int(crop["height"]), int(crop["width"])
    size = image_processor.size
    if size.get("height") is not None:
        return int(size["height"]), int(size["width"])
    return int(size["shortest_edge"]), int(size["shortest_edge"])


def check_processor(config, processor) -> None:
    """Raises if the processor would feed the model images or image-token counts it does not expect."""
    vc = config.vision_config
    h, w = _crop_hw(processor.image_processor)
    problems = []
    if (h, w) != (vc.image_size, vc.image_size):
        problems.append(f"processor output {h}x{w} != vision tower image_size {vc.image_size}")
    if getattr(processor, "patch_size", None) not in (None, vc.patch_size):
        problems.append(f"processor patch_size {processor.patch_size} != tower patch_size {vc.patch_size}")
    strategy = getattr(processor, "vision_feature_select_strategy", None)
    if strategy is not None and strategy != config.vision_feature_select_strategy:
        problems.append(f"processor strategy {strategy!r} != model {config.vision_feature_select_strategy!r}")
    tok = processor.tokenizer
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_id:
        problems.append(f"tokenizer id of {IMAGE_TOKEN} != config.image_token_id {config.image_token_id}")
    if getattr(processor, "patch_size", None):
        n = (h // processor.patch_size) * (w // processor.patch_size) + processor.num_additional_image_tokens
        n -= 1 if strategy == "default" else 0
        if n != num_image_tokens(config):
            problems.append(f"processor gives {n} image tokens, the model expects {num_image_tokens(config)}")
    if problems:
        raise ValueError("processor and model disagree: " + "; ".join(problems))


# --- loading ---------------------------------------------------------------------------------------

def _dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)


def _local_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def quantization_config(args: ModelArgs, skip_modules: list[str]):
    """BitsAndBytesConfig for QLoRA (4-bit) / 8-bit; None when not quantising."""
    if not args.quantized:
        return None
    from transformers import BitsAndBytesConfig

    if args.load_in_4bit:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=args.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=getattr(torch, args.bnb_4bit_compute_dtype),
            bnb_4bit_use_double_quant=args.bnb_4bit_use_double_quant, llm_int8_skip_modules=skip_modules,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)


def _load_kwargs(args: ModelArgs, skip_modules: list[str]) -> dict[str, Any]:
    kw: dict[str, Any] = {"dtype": _dtype(args.torch_dtype)}
    if args.attn_implementation:
        kw["attn_implementation"] = args.attn_implementation
    qc = quantization_config(args, skip_modules)
    if qc is not None:
        kw["quantization_config"] = qc
        kw["device_map"] = args.device_map or {"": _local_device()}
    elif args.device_map:
        kw["device_map"] = args.device_map
    return kw


def build_llava(args: ModelArgs):
    """(LlavaForConditionalGeneration, LlavaProcessor) as `args` describes; see the module docstring."""
    if args.model_name_or_path is not None:
        from llava_address.convert_llava import refuse_original_llava

        refuse_original_llava(args.model_name_or_path)  # before transformers builds a default-config model
        model, processor = _load_llava(args)
    else:
        model, processor = _compose_llava(args)
    if args.vision_tower is not None and args.model_name_or_path is not None:
        model, processor = swap_vision_tower(model, processor, args.vision_tower, args.attn_implementation,
                                             args.vision_feature_layer, args.vision_feature_select_strategy)
    elif args.model_name_or_path is not None and (
            args.vision_feature_layer not in (None, model.config.vision_feature_layer)
            or args.vision_feature_select_strategy not in (None, model.config.vision_feature_select_strategy)):
        raise ValueError("--vision-feature-layer / --vision-feature-select-strategy change what a trained projector "
                         "reads: set them together with --model.vision-tower (a tower swap aligns a fresh projector), "
                         f"or leave them unset to keep the checkpoint's ({model.config.vision_feature_layer}, "
                         f"{model.config.vision_feature_select_strategy!r})")
    check_processor(model.config, processor)
    return model, processor


def _load_llava(args: ModelArgs):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    # Quantise only the LLM: the tower and projector stay in full precision (as in LLaVA's QLoRA).
    # transformers matches skip patterns from the start of the full module name (or as a suffix).
    model = LlavaForConditionalGeneration.from_pretrained(
        args.model_name_or_path, **_load_kwargs(args, [r".*vision_tower", r".*multi_modal_projector", "lm_head"]))
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    return model, processor


_UNUSED_CLIP_PARTS = ("visual_projection.", "text_model.", "text_projection.", "logit_scale")


def _load_tower(path: str, dtype=None, device=None, attn_implementation: str | None = None):
    """(CLIPVisionModel, image processor) from a folder; the image processor config is required."""
    from transformers import AutoImageProcessor, CLIPVisionModel

    kw: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    # Also reads CLIPVisionModelWithProjection / CLIPModel folders (the projection head is not used by LLaVA);
    # a tower weight missing from the folder would be randomly initialised: refused. transformers' load report
    # would flag those unused heads as UNEXPECTED on every load, so it is muted for this call and the keys
    # are checked here instead.
    report_log = logging.getLogger("transformers.modeling_utils")
    level = report_log.level
    report_log.setLevel(logging.ERROR)
    try:
        tower, info = CLIPVisionModel.from_pretrained(str(path), output_loading_info=True, **kw)
    finally:
        report_log.setLevel(level)
    bad = list(info.get("missing_keys", [])) + [str(k) for k in info.get("mismatched_keys", [])]
    if bad:
        raise ValueError(f"vision tower {path}: weights missing or of the wrong shape: {bad[:5]}")
    unused = sorted(k for k in info.get("unexpected_keys", []) if not k.startswith(_UNUSED_CLIP_PARTS))
    if unused:
        log.warning("vision tower %s: %d weights not used by a CLIPVisionModel, e.g. %s", path, len(unused), unused[:3])
    if device is not None:
        tower = tower.to(device)
    try:
        image_processor = AutoImageProcessor.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"vision tower {path} has no image processor config (preprocessor_config.json); its "
                         f"input size and mean/std must come with it, they are never guessed") from e
    h, w = _crop_hw(image_processor)
    if (h, w) != (tower.config.image_size, tower.config.image_size):
        raise ValueError(f"vision tower {path}: its image processor outputs {h}x{w} but the tower expects "
                         f"{tower.config.image_size}x{tower.config.image_size}")
    return tower, image_processor


def _new_processor(image_processor, tokenizer, config, chat_template=None):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=chat_template,
    )


def _param_device_dtype(module: nn.Module):
    p = next(module.parameters())
    return p.device, p.dtype


PROJECTOR_INIT_SEED = 0


def fresh_projector(config, device, dtype) -> torch.nn.Module:
    """A newly initialised LLaVA projector whose weights depend on the config alone.

    It draws from its own seeded RNG: how much randomness the base model's loading consumed before (e.g.
    transformers' ZeRO-3-aware loading) must not change it, so every launcher builds the same model.
    """
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PROJECTOR_INIT_SEED)
        projector = LlavaMultiModalProjector(config)
    return projector.to(device=device, dtype=dtype)


def swap_vision_tower(model, processor, tower_path: str, attn_implementation: str | None = None,
                      feature_layer: int | None = None, select_strategy: str | None = None):
    """Replaces the model's vision tower by the CLIPVisionModel in `tower_path`; returns (model, processor).

    The projector is kept when the new tower has the same width and patch grid as the old one (and the same
    features are read), and re-initialised (logged) otherwise; config.vision_config, image_seq_length and the
    processor (crop/resize size, mean/std, patch size) always follow the new tower. `feature_layer` and
    `select_strategy` (stock LLaVA config fields; None keeps the model's) choose which tower features the
    projector reads: e.g. -1 + 'full' gives it the last layer with the CLS token.
    """
    features_changed = False
    if feature_layer is not None and feature_layer != model.config.vision_feature_layer:
        model.config.vision_feature_layer, features_changed = feature_layer, True
    if select_strategy is not None and select_strategy != model.config.vision_feature_select_strategy:
        model.config.vision_feature_select_strategy, features_changed = select_strategy, True
    if model.model.config is not model.config:
        model.model.config.vision_feature_layer = model.config.vision_feature_layer
        model.model.config.vision_feature_select_strategy = model.config.vision_feature_select_strategy
    old_vc = model.config.vision_config
    device, dtype = _param_device_dtype(model.model.vision_tower)
    tower, image_processor = _load_tower(tower_path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    new_vc = tower.config
    old_grid = (old_vc.image_size // old_vc.patch_size, old_vc.patch_size)
    new_grid = (new_vc.image_size // new_vc.patch_size, new_vc.patch_size)
    model.model.vision_tower = tower
    model.config.vision_config = new_vc
    if model.model.config is not model.config:
        model.model.config.vision_config = new_vc
    model.config.image_seq_length = num_image_tokens(model.config)
    if new_vc.hidden_size != old_vc.hidden_size or new_grid != old_grid or features_changed:
        pdev, pdtype = _param_device_dtype(model.model.multi_modal_projector)
        model.model.multi_modal_projector = fresh_projector(model.config, pdev, pdtype)
        log.warning("vision tower %s: hidden %d -> %d, grid %s -> %s: projector re-initialised (train it: "
                    "projector alignment), %d image tokens per image", tower_path, old_vc.hidden_size,
                    new_vc.hidden_size, old_grid, new_grid, model.config.image_seq_length)
    else:
        log.info("vision tower %s has the base tower's shape: projector kept", tower_path)
    processor = _new_processor(image_processor, processor.tokenizer, model.config,
                               getattr(processor, "chat_template", None))
    return model, processor


def _add_llava_tokens(tokenizer, llm) -> None:
    """Adds `<image>` (and `<pad>` if missing) and resizes the LLM deterministically (new rows = mean row)."""
    added = {}
    if tokenizer.pad_token is None:
        added["pad_token"] = PAD_TOKEN
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
        added["additional_special_tokens"] = [IMAGE_TOKEN]
    if added:
        tokenizer.add_special_tokens(added)
    old = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return
    # Deterministic (no mean_resizing sampling): the composed model must be rebuilt identically at inference.
    llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    with torch.no_grad():
        for emb in (llm.get_input_embeddings(), llm.get_output_embeddings()):
            if emb is not None and emb.weight.shape[0] > old:
                emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)


def _compose_llava(args: ModelArgs):
    """LLaVA from a Llama/Vicuna causal LM + a CLIP vision tower + a fresh projector (LLaVA-1.5 layout)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(args.llm)
    llm = AutoModelForCausalLM.from_pretrained(args.llm, **_load_kwargs(args, ["lm_head"]))
    _add_llava_tokens(tokenizer, llm)
    llm_device, llm_dtype = _param_device_dtype(llm.get_input_embeddings())
    tower_dtype = llm_dtype if llm_dtype.is_floating_point else torch.float32
    if args.quantized:
        tower_dtype = getattr(torch, args.bnb_4bit_compute_dtype) if args.load_in_4bit else torch.float16
    tower, image_processor = _load_tower(args.vision_tower, dtype=tower_dtype, device=llm_device,
                                         attn_implementation=args.attn_implementation)
    config = LlavaConfig(
        vision_config=tower.config, text_config=llm.config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act=args.projector_hidden_act,
        vision_feature_layer=-2 if args.vision_feature_layer is None else args.vision_feature_layer,
        vision_feature_select_strategy=args.vision_feature_select_strategy or "default",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    config.image_seq_length = num_image_tokens(config)
    if args.attn_implementation:
        config._attn_implementation = args.attn_implementation
    with torch.device("meta"):  # no second full-size allocation: the real modules are moved in below
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.multi_modal_projector = fresh_projector(config, llm_device, tower_dtype)
    model.generation_config = llm.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    for attr in ("hf_quantizer", "is_quantized", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit",
                 "hf_device_map"):
        if hasattr(llm, attr):
            setattr(model, attr, getattr(llm, attr))
    if getattr(llm.config, "quantization_config", None) is not None:
        model.config.quantization_config = llm.config.quantization_config
    meta = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if meta:
        raise RuntimeError(f"composed LLaVA has uninitialised tensors: {meta[:5]}")
    log.info("composed LLaVA: LLM %s + tower %s + fresh %s projector (%d image tokens)", args.llm,
             args.vision_tower, args.projector_hidden_act, config.image_seq_length)
    processor = _new_processor(image_processor, tokenizer, config)
    return model, processor


# --- trainable parts -------------------------------------------------------------------------------

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


# --- checkpoints -----------------------------------------------------------------------------------

def _base_name(name: str) -> str:
    """Parameter name in the plain LlavaForConditionalGeneration (drops peft's wrapper prefix)."""
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def save_checkpoint(model, processor, out_dir: str | os.PathLike, model_args: ModelArgs,
                    trainables: TrainablesArgs, state_dict: dict[str, torch.Tensor] | None = None,
                    extra: dict[str, Any] | None = None) -> dict[str, int]:
    """Writes everything needed to rebuild the trained model from its base into `out_dir`.

    Files: `adapter_config.json` + `adapter_model.safetensors` (peft: LoRA and, if trained, the projector
    via modules_to_save) when the LLM uses LoRA; `non_lora_trainables.safetensors` (every other trainable
    parameter, by its plain LLaVA name, and always the projector, which may be freshly initialised);
    `llava_args.json` (ModelArgs, TrainablesArgs, `extra`); `llava_config.json`; the processor.

    model: the unwrapped model (accelerator.unwrap_model). state_dict: the full state dict under ZeRO-3
    (accelerator.get_state_dict(model), keys as model.state_dict()); required when parameters are
    partitioned. Call on the main process only; wrap in fsutil.atomic_dir for atomicity.
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

    if _is_peft(model):
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
    if _is_peft(model):
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

    base_model = model.get_base_model() if _is_peft(model) else model
    (out / LLAVA_CONFIG_FILE).write_text(base_model.config.to_json_string())
    processor.save_pretrained(str(out))
    args = {"format": CHECKPOINT_FORMAT, "model": asdict(model_args), "trainables": asdict(trainables),
            **(extra or {})}
    (out / ARGS_FILE).write_text(json.dumps(args, indent=2) + "\n")
    return counts


def read_checkpoint_args(checkpoint: str | os.PathLike) -> tuple[ModelArgs, TrainablesArgs, dict[str, Any]]:
    """(ModelArgs, TrainablesArgs, the whole llava_args.json) stored in a checkpoint folder."""
    path = Path(checkpoint) / ARGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a LLaVA training checkpoint (no {ARGS_FILE})")
    data = json.loads(path.read_text())
    if data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {data.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    return ModelArgs(**data["model"]), TrainablesArgs(**data["trainables"]), data


def load_for_inference(base: ModelArgs | str | None, checkpoint: str | os.PathLike, **model_overrides):
    """The trained model of a checkpoint, in eval mode: (model, processor).

    base: the base model (ModelArgs, or a LLaVA hub id/path that replaces the stored one); None = the
        ModelArgs stored in the checkpoint (the vision tower swap included).
    model_overrides: ModelArgs fields to change (e.g. torch_dtype="bfloat16", load_in_4bit=False).
    Returns a peft model when the checkpoint holds a LoRA adapter (merge with `merge_and_unload`).
    """
    from clip_stage.core.fs import verify_manifest

    # Checkpoints train-llava wrote carry a manifest: a damaged file is a ManifestError naming it.
    verify_manifest(checkpoint, required=False)
    stored, _, _ = read_checkpoint_args(checkpoint)
    if base is None:
        model_args = stored
    elif isinstance(base, str):
        model_args = dataclasses.replace(stored, model_name_or_path=base, llm=None)
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
    check_processor((model.get_base_model() if _is_peft(model) else model).config, processor)
    return model.eval(), processor
