"""Which tower features the projector reads (stock LLaVA `vision_feature_layer` x `vision_feature_select_strategy`),
chosen at the tower swap: image-token counts follow and stay checked, and merged models load in plain transformers."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llava_address.config import ModelArgs
from llava_address.components import check_processor, num_image_tokens
from llava_address.model import build_llava
from llava_address.prompting import encode_conversation

CONV = [{"from": "human", "value": "<image>\nWhere was this photo taken?"}, {"from": "gpt", "value": "On A Street."}]


def _forward_loss(model, processor):
    enc = encode_conversation(CONV, processor.tokenizer, num_image_tokens(model.config), num_images=1)
    pv = processor.image_processor(images=[Image.new("RGB", (40, 30), (20, 90, 200))], return_tensors="pt")["pixel_values"]
    ids = torch.tensor([enc.input_ids])
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([enc.labels]),
                 pixel_values=pv).loss


@pytest.mark.parametrize("layer,strategy,tokens", [(-2, "default", 16), (-1, "full", 17), (-3, "full", 17)])
def test_swap_with_chosen_features(tiny_llava_dir, tiny_vision_tower_dir, tmp_path, layer, strategy, tokens):
    model, processor = build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir), vision_tower=str(tiny_vision_tower_dir),
                                             vision_feature_layer=layer, vision_feature_select_strategy=strategy))
    assert (model.config.vision_feature_layer, model.config.vision_feature_select_strategy) == (layer, strategy)
    assert model.config.image_seq_length == num_image_tokens(model.config) == tokens
    assert processor.vision_feature_select_strategy == strategy
    assert torch.isfinite(_forward_loss(model, processor))
    # saved as a stock LLaVA folder: plain transformers reads the same features back, processor included
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    again = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m")
    proc = AutoProcessor.from_pretrained(tmp_path / "m")
    assert (again.config.vision_feature_layer, again.config.vision_feature_select_strategy) == (layer, strategy)
    out = proc(images=Image.new("RGB", (48, 48)), text="<image>\nWhere?", return_tensors="pt")
    assert int((out["input_ids"] == again.config.image_token_id).sum()) == tokens
    with torch.no_grad():
        again(**out)


def test_a_token_count_mismatch_is_an_error(tiny_llava_dir, tiny_vision_tower_dir):
    model, processor = build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir), vision_tower=str(tiny_vision_tower_dir),
                                             vision_feature_select_strategy="full"))
    _, default_processor = build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir),
                                                 vision_tower=str(tiny_vision_tower_dir)))
    with pytest.raises(ValueError, match="processor and model disagree"):
        check_processor(model.config, default_processor)


def test_features_of_a_trained_projector_change_only_with_a_swap(tiny_llava_dir):
    with pytest.raises(ValueError, match="with --model.vision-tower"):
        build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir), vision_feature_select_strategy="full"))
    model, _ = build_llava(ModelArgs(model_name_or_path=str(tiny_llava_dir), vision_feature_layer=-2))  # its own: fine
    assert model.config.vision_feature_layer == -2
