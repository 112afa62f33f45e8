"""The plan of an AddressCLIP run: which loss terms the data can feed, how many steps, which rows per step, which lr.

`plan_losses` checks the loss weights against the dataset (captions for the semantic term, coordinates for
the geo term). `epoch_batches` derives each epoch's order from (seed, epoch) alone (the shared
clip_stage.core.training.epoch_permutation), so a resumed run needs only (epoch, batch) to see the batches
the uninterrupted run would; each global batch of `per_device_batch_size x world_size` rows is split into contiguous
per-rank shards. `cosine_lr` is the warm-up + cosine schedule.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pandas as pd

from clip_stage.core.training import epoch_permutation
from clip_stage.core.schema import empty_captions
from clip_stage.train_data import DataCheckError, has_coordinates


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


def steps_per_epoch(num_rows: int, batch_size: int, world_size: int) -> int:
    """Full global batches per epoch (the remainder is dropped: contrastive losses want full batches)."""
    return num_rows // (batch_size * world_size)


def epoch_batches(num_rows: int, batch_size: int, world_size: int, rank: int, seed: int, epoch: int,
                  start_batch: int = 0) -> list[list[int]]:
    """This rank's row indices for each global batch of the epoch, from batch `start_batch` on."""
    order = epoch_permutation(num_rows, seed, epoch)
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
            f"({batch_size} x {world_size} processes); lower --per-device-batch-size"
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
