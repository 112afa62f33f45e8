"""AddressCLIP losses: values of each term, the geo target's sign, and the 2-process gathered path (gloo)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clip_stage.losses import (
    GEO_TARGETS,
    AddressClipLoss,
    contrastive_loss,
    geo_matching_loss,
    geo_target_fn,
    normalise_coords,
    register_geo_target,
)


def _batch(n=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    sem = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    coords = torch.stack([385000 + 600 * torch.rand(n, generator=g, dtype=torch.float64),
                          6672000 + 300 * torch.rand(n, generator=g, dtype=torch.float64)], dim=1)
    return img, txt, sem, coords


def test_contrastive_loss_matches_manual_cross_entropy_and_rewards_alignment():
    img, txt, _, _ = _batch()
    scale = torch.tensor(10.0, dtype=torch.float64)
    logits = scale * img @ txt.T
    manual = 0.0
    for i in range(len(img)):
        manual += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
    assert torch.allclose(contrastive_loss(img, txt, scale), manual / (2 * len(img)))
    # aligned pairs give a lower loss than random ones
    assert contrastive_loss(img, img, scale) < contrastive_loss(img, txt, scale)


def test_normalise_coords_minmax_and_nan_rows():
    c = torch.tensor([[10.0, 5.0], [20.0, 5.0], [15.0, float("nan")]], dtype=torch.float64)
    n = normalise_coords(c)
    assert torch.allclose(n[:2], torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    assert torch.isnan(n[2, 1])


def test_geo_loss_prefers_features_that_mirror_geography():
    # 1-D positions; features on a quarter circle so cosine similarity decreases with distance.
    pos = torch.linspace(0, 1, 6, dtype=torch.float64)
    coords = torch.stack([385000 + 500 * pos, torch.full_like(pos, 6672000.0)], dim=1)
    angle = pos * math.pi / 2
    mirrored = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    reversed_ = mirrored.flip(0)[torch.tensor([0, 5, 1, 4, 2, 3])]  # geography scrambled
    good = geo_matching_loss(mirrored, coords)
    bad = geo_matching_loss(reversed_, coords)
    assert good < bad
    # the linear target: cos(pi/2 * d) vs 1 - d/2 over normalised 1-D distance d; hand-computed
    d = (pos[:, None] - pos[None, :]).abs()
    s = torch.cos(math.pi / 2 * d)
    mask = ~torch.eye(6, dtype=torch.bool)
    assert torch.allclose(good, ((s - (1 - d / 2)) ** 2)[mask].mean())


def test_geo_loss_sign_far_apart_images_should_be_dissimilar():
    # two images at opposite corners of the batch's box: D = 2
    coords = torch.tensor([[385000.0, 6672000.0], [385600.0, 6672300.0]], dtype=torch.float64)
    identical = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert geo_matching_loss(orthogonal, coords) < geo_matching_loss(identical, coords)
    # the published (S - D)^2 prefers identical features here ((1-2)^2 < (0-2)^2): the wrong sign
    assert (1.0 - 2.0) ** 2 < (0.0 - 2.0) ** 2


def test_geo_target_registry():
    d = torch.tensor([0.0, 1.0, 2.0])
    assert torch.allclose(geo_target_fn("linear")(d, 0.5), torch.tensor([1.0, 0.5, 0.0]))
    assert torch.allclose(geo_target_fn("exp")(d, 1.0), torch.exp(-d))
    with pytest.raises(KeyError, match="valid"):
        geo_target_fn("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_geo_target("linear", lambda d, t: d)
    assert {"linear", "exp"} <= set(GEO_TARGETS)


def test_total_is_weighted_sum_and_zero_weights_drop_terms():
    img, txt, sem, coords = _batch()
    scale = torch.tensor(20.0, dtype=torch.float64)
    out = AddressClipLoss(1.0, 0.2, 0.8)(img, txt, scale, sem, coords)
    assert set(out) == {"address_loss", "semantic_loss", "geo_loss", "loss"}
    assert torch.allclose(out["loss"], out["address_loss"] + 0.2 * out["semantic_loss"] + 0.8 * out["geo_loss"])
    only = AddressClipLoss(1.0, 0.0, 0.0)(img, txt, scale)
    assert set(only) == {"address_loss", "loss"}
    assert torch.allclose(only["loss"], contrastive_loss(img, txt, scale))
    with pytest.raises(ValueError, match="semantic_features"):
        AddressClipLoss(1.0, 0.2, 0.0)(img, txt, scale)
    with pytest.raises(KeyError, match="valid"):
        AddressClipLoss(geo_target="bogus")


def _worker(rank: int, world: int, init_file: str, out_file: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        img, txt, sem, coords = _batch(n=8)
        shard = slice(rank * 4, (rank + 1) * 4)
        res = {}
        for with_grad in (False, True):
            li, lt, ls = (t[shard].clone().requires_grad_(True) for t in (img, txt, sem))
            loss_fn = AddressClipLoss(1.0, 0.2, 0.8, rank=rank, world_size=world, gather_with_grad=with_grad)
            out = loss_fn(li, lt, torch.tensor(20.0, dtype=torch.float64), ls, coords[shard])
            out["loss"].backward()
            res[with_grad] = {"terms": {k: v.detach() for k, v in out.items()}, "grads": (li.grad, lt.grad, ls.grad)}
        torch.save(res, out_file)
    finally:
        dist.destroy_process_group()


def test_gathered_loss_equals_full_batch_loss_and_grads_match_after_ddp_averaging(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp_path / "pg"), str(tmp_path / f"out-{r}.pt")))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0

    img, txt, sem, coords = (t.clone() for t in _batch(n=8))
    for t in (img, txt, sem):
        t.requires_grad_(True)
    full = AddressClipLoss(1.0, 0.2, 0.8)(img, txt, torch.tensor(20.0, dtype=torch.float64), sem, coords)
    full["loss"].backward()
    for r, with_grad in [(r, g) for r in range(world) for g in (False, True)]:
        res = torch.load(tmp_path / f"out-{r}.pt", weights_only=True)[with_grad]
        for k, v in full.items():
            assert torch.allclose(res["terms"][k], v.detach(), atol=1e-10), (r, k)
        shard = slice(r * 4, (r + 1) * 4)
        # each rank's gradient w.r.t. its own features is world_size x those rows of the full-batch
        # gradient, so that DDP's average over ranks gives exactly the single-process gradient
        for got, want in zip(res["grads"], (img.grad, txt.grad, sem.grad)):
            assert got is not None and torch.allclose(got, world * want[shard], atol=1e-10)
