"""Training data for AddressCLIP: images + address text + "caption + address" text + UTM coordinates.

`AddressImageDataset` reads a dataset folder (clip_stage.core.schema layout). Augmentation is seeded per
(seed, epoch, row), and clip_stage.schedule derives each epoch's batches from (seed, epoch) alone, so a
resumed run sees exactly the batches and crops an uninterrupted one would: resuming needs only (epoch, batch).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from clip_stage.core.fs import resolve_under_root
from clip_stage.core.schema import Address, DatasetPaths, STORED_STYLES, read_records, render_address


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
        # Only the CPU generator is seeded (torchvision draws from it): torch.manual_seed would also queue a
        # CUDA re-seed, which records a stack trace per item (~1 ms) and resets a GPU's dropout stream.
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(item_seed(self.seed, self.epoch, index))
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
