"""The AddressCLIP losses (paper: arXiv 2407.08156, Sec. 3): pure modules returning a dict of named terms.

    total = a * L_address + b * L_semantic + c * L_geo      (paper: a = 1, b = 0.2, c = 0.8)

- `L_address`: symmetric CLIP (InfoNCE) loss between image features and address-text features.
- `L_semantic`: the same loss against the text "<caption> <address>" (caption first).
- `L_geo`: image-geography matching. Within the (global) batch the UTM coordinates are min-max
  normalised per axis to [0, 1], D = pairwise L1 distance in [0, 2], S = pairwise cosine similarity of
  the image features, and the loss is the mean over pairs i != j of (S - target(D))^2.

Across processes (world_size > 1) features are all-gathered the way open_clip's `ClipLoss` does it:
the gathered copies carry no gradient except the local shard, which is put back into its slot with its
autograd graph. Every rank then computes the same global loss. One deliberate difference: the local
shard's gradient is scaled by world_size. DDP *averages* parameter gradients over ranks; each rank holds
only its shard's share of the feature gradients but the *full* gradient of the logit scale, so plain
averaging (open_clip's default) gives the towers 1/world_size of the global-batch gradient and the logit
scale all of it. With the scaling, every parameter receives exactly the gradient a single process would
compute on the concatenated batch (so N processes x batch B train like 1 process x batch N*B, and
gradient clipping means the same at any world size). `gather_with_grad=True` gets the same result
through the all_gather backward (a sum over ranks).

Used by `clip_stage.train`; `python -m pytest tests/test_clip_losses.py` checks both paths.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F

from clip_stage.core.registry import Registry

# --- geo target mappings: distance D in [0, 2] -> target cosine similarity in [-1, 1] -----------------
# Why a mapping at all: the published formula penalises (S - D_geo)^2, a *similarity* against a
# *distance*. Minimising it pulls far-apart images (large D) towards high similarity and nearby images
# (D ~ 0) towards orthogonality: the opposite of the stated goal that the feature space mirror geography.
# We therefore compare S with a similarity derived from D (decreasing in D, 1 at D = 0).

# name -> `fn(D, tau) -> target similarity`
GEO_TARGETS: Registry[Callable[[torch.Tensor, float], torch.Tensor]] = Registry("geo target")
register_geo_target = GEO_TARGETS.register
geo_target_fn = GEO_TARGETS.lookup


register_geo_target("linear", lambda d, tau: 1.0 - d / 2.0)  # D=0 -> 1, D=2 -> 0 (default)
register_geo_target("exp", lambda d, tau: torch.exp(-d / tau))  # D=0 -> 1, decays with scale tau
register_geo_target("signed", lambda d, tau: 1.0 - d)  # D=0 -> 1, D=1 -> 0, D=2 -> -1


# --- gathering ---------------------------------------------------------------------------------------

class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by a constant in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def gather_features(
    *tensors: torch.Tensor, rank: int = 0, world_size: int = 1, gather_with_grad: bool = False
) -> tuple[torch.Tensor, ...]:
    """All-gathers each tensor along dim 0 (equal shard sizes), keeping the local shard's gradient.

    With `gather_with_grad`, gradients flow through every shard (torch.distributed.nn.all_gather);
    by default only through the local one (like open_clip's default), scaled by world_size so that
    DDP's gradient averaging yields the global-batch gradient.
    """
    if world_size <= 1:
        return tensors
    out = []
    for t in tensors:
        if gather_with_grad:
            out.append(torch.cat(dist_nn.all_gather(t), dim=0))
        else:
            parts = [torch.zeros_like(t) for _ in range(world_size)]
            dist.all_gather(parts, t.detach().contiguous())
            parts[rank] = _ScaleGrad.apply(t, float(world_size))  # local shard keeps its graph (see module doc)
            out.append(torch.cat(parts, dim=0))
    return tuple(out)


# --- the terms ---------------------------------------------------------------------------------------

def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss over matching rows (features already L2-normalised)."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def normalise_coords(coords: torch.Tensor) -> torch.Tensor:
    """Per-axis min-max normalisation to [0, 1] over the rows with finite coordinates (NaN rows stay NaN)."""
    finite = torch.isfinite(coords).all(dim=1)
    if finite.sum() == 0:
        return coords
    valid = coords[finite]
    lo, hi = valid.min(dim=0).values, valid.max(dim=0).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))  # a constant axis contributes distance 0
    return (coords - lo) / span


def geo_matching_loss(
    image_features: torch.Tensor, coords: torch.Tensor, target: str = "linear", tau: float = 0.5
) -> torch.Tensor:
    """Mean over pairs i != j (both with coordinates) of (cos(f_i, f_j) - target(D_ij))^2."""
    coords = coords.to(torch.float64)  # UTM metres ~ 1e6: float32 would lose sub-metre differences
    xy = normalise_coords(coords)
    dist = (xy[:, None, :] - xy[None, :, :]).abs().sum(-1)  # L1, in [0, 2]
    finite = torch.isfinite(xy).all(dim=1)
    n = xy.shape[0]
    mask = finite[:, None] & finite[None, :] & ~torch.eye(n, dtype=torch.bool, device=xy.device)
    if mask.sum() == 0:
        return image_features.sum() * 0.0  # keeps the graph; nothing to match
    f = F.normalize(image_features.to(torch.promote_types(image_features.dtype, torch.float32)), dim=-1)
    sim = f @ f.T
    tgt = geo_target_fn(target)(torch.nan_to_num(dist, nan=0.0), tau).to(sim.dtype)
    return ((sim - tgt) ** 2)[mask].mean()


class AddressClipLoss(nn.Module):
    """Weighted sum of the three AddressCLIP terms; returns {"address_loss", ["semantic_loss"], ["geo_loss"], "loss"}.

    Terms with weight 0 are neither computed nor returned. Features are expected L2-normalised (open_clip's
    output_dict features are). `coords` are projected metres (e.g. UTM), shape [B, 2]; NaN rows are ignored.
    """

    def __init__(
        self,
        address_weight: float = 1.0,
        semantic_weight: float = 0.2,
        geo_weight: float = 0.8,
        geo_target: str = "linear",
        geo_tau: float = 0.5,
        rank: int = 0,
        world_size: int = 1,
        gather_with_grad: bool = False,
    ):
        super().__init__()
        geo_target_fn(geo_target)  # fail early on unknown names
        if min(address_weight, semantic_weight, geo_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if address_weight + semantic_weight + geo_weight <= 0:
            raise ValueError("at least one loss weight must be > 0")
        self.address_weight = address_weight
        self.semantic_weight = semantic_weight
        self.geo_weight = geo_weight
        self.geo_target = geo_target
        self.geo_tau = geo_tau
        self.rank = rank
        self.world_size = world_size
        self.gather_with_grad = gather_with_grad

    def forward(
        self,
        image_features: torch.Tensor,
        address_features: torch.Tensor,
        logit_scale: torch.Tensor,
        semantic_features: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        tensors = [image_features, address_features]
        use_sem = self.semantic_weight > 0
        use_geo = self.geo_weight > 0
        if use_sem:
            if semantic_features is None:
                raise ValueError("semantic_weight > 0 needs semantic_features (caption + address)")
            tensors.append(semantic_features)
        if use_geo:
            if coords is None:
                raise ValueError("geo_weight > 0 needs coords")
        gathered = gather_features(
            *tensors, rank=self.rank, world_size=self.world_size, gather_with_grad=self.gather_with_grad
        )
        all_img, all_addr = gathered[0], gathered[1]
        out: dict[str, torch.Tensor] = {}
        total = all_img.new_zeros(())
        if self.address_weight > 0:
            out["address_loss"] = contrastive_loss(all_img, all_addr, logit_scale)
            total = total + self.address_weight * out["address_loss"]
        if use_sem:
            out["semantic_loss"] = contrastive_loss(all_img, gathered[2], logit_scale)
            total = total + self.semantic_weight * out["semantic_loss"]
        if use_geo:
            (all_coords,) = gather_features(coords.to(torch.float64), rank=self.rank, world_size=self.world_size)
            out["geo_loss"] = geo_matching_loss(all_img, all_coords, self.geo_target, self.geo_tau)
            total = total + self.geo_weight * out["geo_loss"]
        out["loss"] = total
        return out


def logit_scale_clamp_(model: nn.Module, max_scale: float = math.log(100.0)) -> None:
    """Clamps open_clip's learnable log temperature to [0, ln 100] in place, as the CLIP recipe does."""
    with torch.no_grad():
        scale = getattr(model, "logit_scale", None)
        if scale is not None:
            scale.clamp_(0, max_scale)
