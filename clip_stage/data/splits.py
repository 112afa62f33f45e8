"""build-dataset's split step: train / val / test per image (random by sub-street, or geographic tiles).

`assign_splits` is seeded (SplitConfig.seed); `split_fractions` reports the fractions reached and warns when
a split is far from the one asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class SplitConfig:
    """Train / val / test assignment."""

    split: Literal["random", "geo"] = "random"
    """random: per sub-street (test sub-streets also in train); geo: geographically disjoint held-out tiles."""
    val_fraction: float = 0.1
    """Fraction of images in val."""
    test_fraction: float = 0.2
    """Fraction of images in test."""
    tile_size_m: float = 250.0
    """Side of the square UTM tiles of the geo split (metres)."""
    seed: int = 0
    """Random seed of the split."""

    def __post_init__(self):
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(
                f"val_fraction and test_fraction must be in [0, 1) with a sum below 1, got "
                f"{self.val_fraction}, {self.test_fraction}"
            )
        if self.tile_size_m <= 0:
            raise ValueError(f"tile_size_m must be > 0, got {self.tile_size_m}")


def _stochastic_round(v: float, rng: np.random.Generator) -> int:
    base = math.floor(v)
    return base + int(rng.random() < v - base)


def assign_splits(utm_x: np.ndarray, utm_y: np.ndarray, sub_idx: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """train / val / test per point (object array), seeded."""
    n = len(sub_idx)
    rng = np.random.default_rng(cfg.seed)
    split = np.full(n, "train", dtype=object)
    if n == 0:
        return split
    if cfg.split == "random":
        # per sub-street, so that test sub-streets are seen in training: each keeps >= 1 train image
        order = np.argsort(sub_idx, kind="stable")
        bounds = np.flatnonzero(np.r_[True, sub_idx[order][1:] != sub_idx[order][:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:]):
            idx = order[a:b].copy()
            rng.shuffle(idx)
            k = len(idx)
            n_test = _stochastic_round(k * cfg.test_fraction, rng)
            n_val = _stochastic_round(k * cfg.val_fraction, rng)
            while n_test + n_val > k - 1 and n_test + n_val > 0:
                if n_val >= n_test and n_val > 0:
                    n_val -= 1
                else:
                    n_test -= 1
            split[idx[:n_test]] = "test"
            split[idx[n_test : n_test + n_val]] = "val"
        return split
    # geo: whole tiles go to test / val, so no held-out tile has a training image
    tx = np.floor(utm_x / cfg.tile_size_m).astype(np.int64)
    ty = np.floor(utm_y / cfg.tile_size_m).astype(np.int64)
    tiles, tile_of = np.unique(np.stack([tx, ty], axis=1), axis=0, return_inverse=True)
    tile_of = tile_of.reshape(-1)
    counts = np.bincount(tile_of, minlength=len(tiles))
    perm = rng.permutation(len(tiles))
    tile_split = np.full(len(tiles), "train", dtype=object)
    n_test = n_val = 0
    for t in perm:
        if n_test < cfg.test_fraction * n:
            tile_split[t], n_test = "test", n_test + counts[t]
        elif n_val < cfg.val_fraction * n:
            tile_split[t], n_val = "val", n_val + counts[t]
    if not (tile_split == "train").any():  # too few tiles: the last assigned one trains
        tile_split[perm[-1]] = "train"
    return tile_split[tile_of]


def split_fractions(split_counts: dict[str, int], cfg: SplitConfig) -> tuple[dict, list[str]]:
    """The requested and realised val/test fractions, and a warning for each realised one that is off by more
    than half of its request (or non-zero when none was asked). Only the geo split warns: whole tiles move
    at once, so a few big tiles can put most images in test (the random split rounds per sub-street)."""
    n = sum(split_counts.values())
    requested = {"val": cfg.val_fraction, "test": cfg.test_fraction}
    requested["train"] = 1.0 - requested["val"] - requested["test"]
    realised = {k: (split_counts.get(k, 0) / n if n else 0.0) for k in ("train", "val", "test")}
    fractions = {"requested": {k: round(requested[k], 6) for k in ("train", "val", "test")},
                 "realised": {k: round(v, 6) for k, v in realised.items()}}
    warnings = []
    if cfg.split == "geo" and n:
        for k in ("test", "val"):
            want, got = requested[k], realised[k]
            if abs(got - want) > want / 2 or (want == 0 and got > 0):
                warnings.append(f"geo split: {k} holds {got:.0%} of the images ({split_counts.get(k, 0)} of {n}) for "
                                f"{want:.0%} asked: the {cfg.tile_size_m:g} m tiles are too few or too uneven for "
                                f"this request (try a smaller --tile-size-m)")
    return fractions, warnings
