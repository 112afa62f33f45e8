"""Trimmed text encoding (clip_stage.text_encoder): same features and gradients as open_clip, shorter batches."""

from __future__ import annotations

import pickle

import pytest
import torch

from clip_stage.train_data import Collate
from clip_stage.text_encoder import ContrastiveForward, PaddingTrim, encode_text, padding_trim

TEXTS = [
    "Main St between 3rd Ave and 4th Ave, Downtown, Pittsburgh",
    "Oak St!",  # "!" is token id 0, the padding id: trimming must not count non-zero tokens
    "a street view of a red brick building with parked cars. Forbes Ave between Atwood St and Bouquet St",
]
LONG = "a street view of " + "tall grey buildings and trees " * 20  # longer than any context: truncated


def _tiny_cfgs(**text_overrides):
    vision = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
    text = {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, **text_overrides}
    return vision, text


def _clip(kind: str = "clip", **text_overrides):
    from open_clip.model import CLIP, CustomTextCLIP

    torch.manual_seed(0)
    vision, text = _tiny_cfgs(**text_overrides)
    cls = CustomTextCLIP if kind == "custom" else CLIP
    return cls(embed_dim=16, vision_cfg=vision, text_cfg=text, output_dict=True)


@pytest.fixture(scope="module")
def tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32", context_length=32)


@pytest.mark.parametrize("kind,overrides", [
    ("clip", {}),                                    # OpenAI CLIP layout: causal, argmax (EOT) pooling
    ("clip", {"pool_type": "eos", "eos_id": 49407}),
    ("custom", {}),                                  # CustomTextCLIP with open_clip's TextTransformer
])
def test_trimmed_features_and_gradients_equal_open_clips(tokenizer, kind, overrides):
    model = _clip(kind, **overrides)
    trim = padding_trim(model)
    assert trim is not None
    tokens = tokenizer(TEXTS)
    short = trim(tokens)
    assert short.shape[1] < tokens.shape[1]
    assert short.shape[1] == int(tokens.argmax(dim=-1).max()) + 1  # right after the last EOT, not before

    full = model.encode_text(tokens, normalize=True)
    full.sum().backward()
    grads_full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    trimmed = encode_text(model, short)
    trimmed.sum().backward()
    grads_trim = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(trimmed, full, atol=1e-6, rtol=1e-5)
    assert grads_trim.keys() == grads_full.keys()
    for name in grads_full:
        scale = float(grads_full[name].abs().max()) + 1e-12  # sums over 77 vs n positions: rounding differs
        torch.testing.assert_close(grads_trim[name], grads_full[name], atol=1e-6 * scale, rtol=1e-4, msg=name)


def test_a_text_filling_the_context_keeps_the_full_length(tokenizer):
    model = _clip()
    tokens = tokenizer(TEXTS + [LONG])
    short = padding_trim(model)(tokens)
    assert short.shape == tokens.shape
    torch.testing.assert_close(encode_text(model, short), model.encode_text(tokens, normalize=True))


@pytest.mark.parametrize("kind,overrides", [
    ("clip", {"no_causal_mask": True}),  # bidirectional: every position sees the padding
    ("clip", {"pool_type": "last"}),
    ("custom", {"embed_cls": True}),    # CoCa-style appended class token
])
def test_towers_where_trimming_is_not_exact_are_left_alone(tokenizer, kind, overrides):
    model = _clip(kind, **overrides)
    assert padding_trim(model) is None
    tokens = tokenizer(TEXTS)
    torch.testing.assert_close(encode_text(model, tokens), model.encode_text(tokens, normalize=True))


def test_contrastive_forward_matches_open_clip_forward(tokenizer):
    model = _clip()
    trim = padding_trim(model)
    images = torch.randn(3, 3, 32, 32)
    address, semantic = tokenizer(TEXTS[:2] + ["Elm St"]), tokenizer(TEXTS)
    ref_addr = model(images, address)
    ref_sem = model.encode_text(semantic, normalize=True)

    out = ContrastiveForward(model)(images, trim(address), trim(semantic))
    assert set(out) == {"image_features", "address_features", "semantic_features", "logit_scale"}
    torch.testing.assert_close(out["image_features"], ref_addr["image_features"])
    torch.testing.assert_close(out["address_features"], ref_addr["text_features"])
    torch.testing.assert_close(out["semantic_features"], ref_sem)
    assert "semantic_features" not in ContrastiveForward(model)(images, trim(address))
    # the wrapper adds no parameters of its own: checkpoints keep open_clip's state dict
    assert {n.removeprefix("clip.") for n, _ in ContrastiveForward(model).named_parameters()} == \
        {n for n, _ in model.named_parameters()}


def test_collate_trims_each_text_batch_on_cpu(tokenizer):
    trim = PaddingTrim("argmax")
    trim = pickle.loads(pickle.dumps(trim))  # DataLoader workers receive the collate by pickling
    items = [{"image": torch.zeros(3, 4, 4), "address": a, "semantic": s, "coords": torch.zeros(2, dtype=torch.float64),
              "index": i} for i, (a, s) in enumerate(zip(["Oak St", "Elm St"], TEXTS[1:]))]
    batch = Collate(tokenizer, with_semantic=True, trim=trim)(items)
    untrimmed = Collate(tokenizer, with_semantic=True)(items)
    assert untrimmed["address_tokens"].shape[1] == 32
    for key in ("address_tokens", "semantic_tokens"):
        n = batch[key].shape[1]
        assert n == int(untrimmed[key].argmax(dim=-1).max()) + 1
        assert torch.equal(batch[key], untrimmed[key][:, :n])
        assert (untrimmed[key][:, n:] == 0).all()
    assert batch["address_tokens"].shape[1] < batch["semantic_tokens"].shape[1]
