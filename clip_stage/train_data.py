"""Training data for AddressCLIP: images + address text + "caption + address" text + UTM coordinates.

`AddressImageDataset` reads a dataset folder (clip_stage.core.schema layout). Augmentation is seeded per
(seed, epoch, row), and `epoch_batches` derives each epoch's order from (seed, epoch) alone, so a resumed
run sees exactly the batches and crops an uninterrupted one would: resuming needs only (epoch, batch).
Each global batch of `batch_size x world_size` rows is split into contiguous per-rank shards.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from clip_stage.core.fs import resolve_under_root
from clip_stage.core.schema import Address, DatasetPaths, STORED_STYLES, empty_captions, read_records, render_address


class DataCheckError(ValueError):
    """A dataset that cannot feed the requested losses (no captions for b > 0, no coordinates for c > 0)."""


def address_texts(df: pd.DataFrame, style: str) -> list[str]:
    """Address text per row: the stored `address_<style>` column, else rendered from the fields."""
    if style in STORED_STYLES and f"address_{style}" in df.columns:
        return [str(s) for s in df[f"address_{style}"]]
    return [render_address(Address.from_row(row), style) for _, row in df.iterrows()]


def has_coordinates(df: pd.DataFrame) -> np.ndarray:
    """Per row: finite UTM coordinates present."""
    if "utm_x" not in df.columns or "utm_y" not in df.columns:
        return np.zeros(len(df), dtype=bool)
    xy = df[["utm_x", "utm_y"]].to_numpy(dtype=np.float64, na_value=np.nan)
    return np.isfinite(xy).all(axis=1)


@dataclass(frozen=True)
class LossPlan:
    """The loss weights after checking them against the data (what training actually uses)."""

    address_weight: float
    semantic_weight: float
    geo_weight: float
    notes: tuple[str, ...] = ()


def plan_losses(df: pd.DataFrame, address_weight: float, semantic_weight: float, geo_weight: float | None,
                default_geo_weight: float = 0.8, where: str = "dataset") -> LossPlan:
    """Checks the data against the loss weights.

    - semantic weight > 0 and any empty caption: error (run `address-llava caption` or pass --semantic-weight 0).
    - geo weight unset: the default if every row has coordinates; off with a warning if none has.
    - geo weight set > 0 and no row has coordinates: error. Rows without coordinates are left out of
      the geo term (a warning says how many).
    """
    notes = []
    empty = empty_captions(df)
    if semantic_weight > 0 and empty.any():
        raise DataCheckError(
            f"{where}: {int(empty.sum())} of {len(df)} rows have an empty caption but --semantic-weight is "
            f"{semantic_weight}; fill them with `address-llava caption --dataset ...` or pass --semantic-weight 0"
        )
    coords = has_coordinates(df)
    if geo_weight is None:
        if coords.any():
            geo = default_geo_weight
        else:
            geo = 0.0
            notes.append(f"{where}: no UTM coordinates (utm_x/utm_y): the geo loss is disabled")
    else:
        geo = geo_weight
        if geo > 0 and not coords.any():
            raise DataCheckError(
                f"{where}: --geo-weight {geo} asks for the geo loss but no row has UTM coordinates "
                f"(utm_x/utm_y); pass --geo-weight 0 or leave it unset"
            )
    if geo > 0 and not coords.all():
        notes.append(f"{where}: {int((~coords).sum())} of {len(df)} rows lack coordinates; they are left out of the geo loss")
    for n in notes:
        warnings.warn(n, stacklevel=2)
    if address_weight + semantic_weight + geo <= 0:
        raise DataCheckError("all loss weights are 0 after checking the data: nothing to train")
    return LossPlan(address_weight, semantic_weight, geo, tuple(notes))


def parse_fold(text: str) -> tuple[int, int]:
    """'k/n' -> (k, n), with 1 <= k <= n and n >= 2."""
    k, sep, n = str(text).partition("/")
    try:
        k_i, n_i = int(k), int(n)
    except ValueError:
        k_i = n_i = 0
    if not sep or n_i < 2 or not 1 <= k_i <= n_i:
        raise ValueError(f"fold {text!r}: expected k/n with n >= 2 and 1 <= k <= n, e.g. 1/3")
    return k_i, n_i


def fold_of(image_ids: Sequence[str], n: int) -> np.ndarray:
    """Fold number (1..n) of each image id: a hash of the id alone, so every command agrees on it."""
    return np.array([int(hashlib.sha256(str(i).encode("utf-8")).hexdigest()[:12], 16) % n + 1 for i in image_ids],
                    dtype=np.int64)


def drop_fold(df: pd.DataFrame, holdout_fold: str) -> pd.DataFrame:
    """The rows of `df` outside fold k of n (`holdout_fold` = 'k/n'; '' keeps every row)."""
    if not holdout_fold:
        return df
    k, n = parse_fold(holdout_fold)
    return df[fold_of(df["image_id"].astype(str).tolist(), n) != k].reset_index(drop=True)


def item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class AddressImageDataset(torch.utils.data.Dataset):
    """Rows of one split -> {"image", "address", "semantic", "coords", "index"}."""

    def __init__(self, dataset_dir: str | Path, split: str | None, transform: Callable,
                 address_style: str = "full", semantic_template: str = "{caption}. {address}", seed: int = 0,
                 df: pd.DataFrame | None = None):
        self.paths = DatasetPaths(dataset_dir)
        self.df = read_records(dataset_dir, split) if df is None else df.reset_index(drop=True)
        if len(self.df) == 0:
            raise DataCheckError(f"{dataset_dir}: split {split!r} has no rows")
        self.transform = transform
        self.addresses = address_texts(self.df, address_style)
        captions = self.df["caption"].fillna("").astype(str).tolist() if "caption" in self.df else [""] * len(self.df)
        self.semantic = [
            semantic_template.format(caption=c.strip().rstrip("."), address=a) if c.strip() else a
            for c, a in zip(captions, self.addresses)
        ]
        xy = self.df[["utm_x", "utm_y"]].to_numpy(dtype=np.float64, na_value=np.nan) if "utm_x" in self.df else \
            np.full((len(self.df), 2), np.nan)
        self.coords = torch.from_numpy(np.array(xy, dtype=np.float64))
        self.images = self.df["image"].astype(str).tolist()
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.df)

    def load_image(self, index: int) -> Image.Image:
        with Image.open(resolve_under_root(self.paths.images, self.images[index])) as im:
            return im.convert("RGB")

    def __getitem__(self, index: int) -> dict:
        image = self.load_image(index)
        # Random augmentation from a per-(seed, epoch, row) stream: identical in resumed runs and workers.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, self.epoch, index))
            pixels = self.transform(image)
        return {"image": pixels, "address": self.addresses[index], "semantic": self.semantic[index],
                "coords": self.coords[index], "index": index}


class Collate:
    """Stacks images/coords and tokenizes both texts (picklable for DataLoader workers).

    `trim` (see `clip_stage.text_encoder.padding_trim`) cuts each token batch after its last EOT, on CPU.
    """

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor], with_semantic: bool = True,
                 trim: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.tokenizer = tokenizer
        self.with_semantic = with_semantic
        self.trim = trim

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts)
        return self.trim(tokens) if self.trim is not None else tokens

    def __call__(self, items: Sequence[dict]) -> dict:
        out = {
            "image": torch.stack([it["image"] for it in items]),
            "address_tokens": self._tokens([it["address"] for it in items]),
            "coords": torch.stack([it["coords"] for it in items]),
            "index": torch.tensor([it["index"] for it in items]),
        }
        if self.with_semantic:
            out["semantic_tokens"] = self._tokens([it["semantic"] for it in items])
        return out


def steps_per_epoch(num_rows: int, batch_size: int, world_size: int) -> int:
    """Full global batches per epoch (the remainder is dropped: contrastive losses want full batches)."""
    return num_rows // (batch_size * world_size)


def epoch_batches(num_rows: int, batch_size: int, world_size: int, rank: int, seed: int, epoch: int,
                  start_batch: int = 0) -> list[list[int]]:
    """This rank's row indices for each global batch of the epoch, from batch `start_batch` on."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_rows, generator=g).tolist()
    global_bs = batch_size * world_size
    n = steps_per_epoch(num_rows, batch_size, world_size)
    out = []
    for b in range(start_batch, n):
        chunk = order[b * global_bs:(b + 1) * global_bs]
        out.append(chunk[rank * batch_size:(rank + 1) * batch_size])
    return out


def check_batch_size(num_rows: int, batch_size: int, world_size: int, where: str) -> None:
    if steps_per_epoch(num_rows, batch_size, world_size) == 0:
        raise DataCheckError(
            f"{where}: {num_rows} training rows are fewer than one global batch "
            f"({batch_size} x {world_size} processes); lower --batch-size"
        )


def total_steps(num_rows: int, batch_size: int, world_size: int, epochs: int, max_steps: int | None) -> int:
    n = steps_per_epoch(num_rows, batch_size, world_size) * epochs
    return min(n, max_steps) if max_steps else n


def cosine_lr(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to `min_lr` at `total`."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
