"""Text encoding without the padding: the same features as open_clip's `encode_text`, at a fraction of the cost.

open_clip pads every text to the context length (77 tokens) and runs the whole padded sequence through
the text transformer. Addresses are 15-30 tokens and "caption. address" texts 30-50, so most of that
work is spent on padding. For a *causal* text tower pooled at the end-of-text token (OpenAI CLIP and
every open_clip `CLIP` with argmax/eos pooling), no position up to the EOT attends to a later one, so
cutting a batch right after its last pooled position changes no feature and no gradient, only the cost.

- `PaddingTrim` cuts a token batch after its last pooled position. It is computed on CPU (in the
  DataLoader's collate), so trimming costs no device synchronisation.
- `encode_text` encodes a token batch of any length up to the context length; for towers where trimming
  is not exact (bidirectional towers, first/last/mean pooling, CoCa's appended class token, Hugging Face
  text towers) `padding_trim` returns None and this falls back to the model's own `encode_text`.
- `ContrastiveForward` is the training forward (image, address and optional semantic features in one
  module call), so DDP / accelerate wrap one forward and their gradient hooks see every parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def _trimmable_tower(model: nn.Module) -> tuple[nn.Module, str, int | None] | None:
    """(the module holding the text transformer, its pool type, its eos id) when trimming is exact, else None."""
    from open_clip.model import CLIP
    from open_clip.transformer import TextTransformer

    if isinstance(model, CLIP):
        tower, pool, eos = model, model.text_pool_type, getattr(model, "text_eos_id", None)
    elif isinstance(getattr(model, "text", None), TextTransformer):
        tower = model.text
        if tower.cls_emb is not None or tower.use_pad_mask:
            return None  # CoCa pools an appended token; pad masks depend on the full length
        pool, eos = tower.pool_type, getattr(tower, "eos_id", None)
    else:
        return None
    if getattr(tower, "attn_mask", None) is None:
        return None  # bidirectional: every position sees the padding
    if pool not in ("argmax", "eos") or (pool == "eos" and eos is None):
        return None
    return tower, pool, eos


@dataclass(frozen=True)
class PaddingTrim:
    """Cuts token batches right after the last pooled (EOT) position; picklable for DataLoader workers."""

    pool_type: str
    eos_id: int | None = None

    def pooled_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each row's pooled position, computed exactly as open_clip's `text_global_pool` does."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        return (tokens == self.eos_id).int().argmax(dim=-1)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.numel() == 0:
            return tokens
        n = int(self.pooled_positions(tokens).max()) + 1
        return tokens[:, :n]


def padding_trim(model: nn.Module) -> PaddingTrim | None:
    """The trim that is exact for this model's text tower, or None where trimming would change features."""
    spec = _trimmable_tower(model)
    return None if spec is None else PaddingTrim(spec[1], spec[2])


def encode_text(model: nn.Module, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """open_clip's `encode_text` for token batches of any length <= the context length.

    Pass tokens cut by `padding_trim(model)`: then the features equal those of the full padded batch.
    """
    spec = _trimmable_tower(model)
    if spec is None:
        return model.encode_text(tokens, normalize=normalize)
    tower, pool, eos = spec
    n = tokens.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype) + tower.positional_embedding[:n].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:n, :n])
    x = tower.ln_final(x)
    pos = PaddingTrim(pool, eos).pooled_positions(tokens)
    x = x[torch.arange(x.shape[0], device=x.device), pos]
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x


class ContrastiveForward(nn.Module):
    """images, address tokens [, semantic tokens] -> normalised features and the logit scale.

    Address and semantic texts are encoded in two calls, each as long as its own batch needs (addresses
    are about half as long as "caption. address"), rather than one call padded to the longer.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(
        self, images: torch.Tensor, address_tokens: torch.Tensor, semantic_tokens: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        out = {
            "image_features": self.clip.encode_image(images, normalize=True),
            "address_features": encode_text(self.clip, address_tokens),
            "logit_scale": self.clip.logit_scale.exp(),
        }
        if semantic_tokens is not None:
            out["semantic_features"] = encode_text(self.clip, semantic_tokens)
        return out


__all__ = ["ContrastiveForward", "PaddingTrim", "encode_text", "padding_trim"]
