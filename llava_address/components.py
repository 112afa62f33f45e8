"""The parts of a LLaVA-1.5 model and what keeps them consistent: the `<image>` and `<pad>` tokens, the CLIP
vision tower with its image processor, the processor, and a fresh projector.

Shared by building (llava_address.model), converting original checkpoints (llava_address.convert_llava) and
loading checkpoints (llava_address.checkpoint); imports no other module of the LLaVA stage.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from conversations.records import IMAGE_TOKEN

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
# Checkpoint layout (one folder per checkpoint; see save_checkpoint).


def num_image_tokens(config) -> int:
    """Image-token ids per image = visual features the projector yields (patches, + CLS if strategy 'full')."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n + (1 if config.vision_feature_select_strategy == "full" else 0)


def crop_hw(image_processor) -> tuple[int, int]:
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
    h, w = crop_hw(processor.image_processor)
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


_UNUSED_CLIP_PARTS = ("visual_projection.", "text_model.", "text_projection.", "logit_scale")


def load_tower(path: str, dtype=None, device=None, attn_implementation: str | None = None):
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
    h, w = crop_hw(image_processor)
    if (h, w) != (tower.config.image_size, tower.config.image_size):
        raise ValueError(f"vision tower {path}: its image processor outputs {h}x{w} but the tower expects "
                         f"{tower.config.image_size}x{tower.config.image_size}")
    return tower, image_processor


def new_processor(image_processor, tokenizer, config, chat_template=None):
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=chat_template,
    )


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


def add_llava_tokens(tokenizer, llm) -> None:
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
