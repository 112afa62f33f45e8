"""Build LLaVA-1.5 (HF `LlavaForConditionalGeneration` + processor) and swap in a vision tower.

- `build_llava(ModelArgs)`: a HF LLaVA checkpoint by hub id or path (e.g. `llava-hf/llava-1.5-7b-hf`), with
  dtype, attention kernel, 4/8-bit bitsandbytes quantisation (QLoRA) and device_map; or a LLaVA composed
  from a Vicuna/Llama LLM, a CLIP vision tower and a fresh `mlp2x_gelu` projector (LLaVA-1.5 defaults:
  feature layer -2, CLS dropped). `ModelArgs.vision_tower` swaps a `CLIPVisionModel` folder (the AddressCLIP
  export) into the model; when its width or patch grid differs, the projector is re-initialised and the
  image-token count and processor (size, mean/std) follow the new tower.

What trains is llava_address.trainables; saving and loading checkpoints is llava_address.checkpoint; the
model's parts (tokens, tower, processor, projector) are llava_address.components.

Module paths (transformers 5): `model.vision_tower` (CLIPVisionModel), `model.multi_modal_projector`,
`model.language_model` (LlamaModel), `lm_head`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from clip_stage.core.outdir import check_model_folder
from llava_address.components import (IMAGE_TOKEN, add_llava_tokens, check_processor, fresh_projector, load_tower,
                                      new_processor, num_image_tokens)
from llava_address.config import ModelArgs
from llava_address.convert_llava import refuse_original_llava

log = logging.getLogger(__name__)


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


def check_model_paths(args: ModelArgs) -> None:
    """Refuses, before transformers touches them, model options that name a folder without config.json (loaded
    anyway, transformers would build a default 7B LLaVA and report every weight missing) or a local path that
    does not exist (it would be tried as a hub id, with minutes of retries offline)."""
    for flag, spec in (("--model-name-or-path", args.model_name_or_path), ("--model.llm", args.llm),
                       ("--model.vision-tower", args.vision_tower)):
        if spec:
            check_model_folder(spec, flag)


def build_llava(args: ModelArgs):
    """(LlavaForConditionalGeneration, LlavaProcessor) as `args` describes; see the module docstring."""
    check_model_paths(args)
    if args.model_name_or_path is not None:
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


def _param_device_dtype(module: nn.Module):
    p = next(module.parameters())
    return p.device, p.dtype


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
    tower, image_processor = load_tower(tower_path, dtype=dtype, device=device, attn_implementation=attn_implementation)
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
    processor = new_processor(image_processor, processor.tokenizer, model.config,
                               getattr(processor, "chat_template", None))
    return model, processor


def _compose_llava(args: ModelArgs):
    """LLaVA from a Llama/Vicuna causal LM + a CLIP vision tower + a fresh projector (LLaVA-1.5 layout)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(args.llm)
    llm = AutoModelForCausalLM.from_pretrained(args.llm, **_load_kwargs(args, ["lm_head"]))
    add_llava_tokens(tokenizer, llm)
    llm_device, llm_dtype = _param_device_dtype(llm.get_input_embeddings())
    tower_dtype = llm_dtype if llm_dtype.is_floating_point else torch.float32
    if args.quantized:
        tower_dtype = getattr(torch, args.bnb_4bit_compute_dtype) if args.load_in_4bit else torch.float16
    tower, image_processor = load_tower(args.vision_tower, dtype=tower_dtype, device=llm_device,
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
    processor = new_processor(image_processor, tokenizer, config)
    return model, processor
