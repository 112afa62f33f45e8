"""Evaluate a CLIP model on image address localisation: rank a gallery of candidate addresses per image.

    address-llava eval-clip --checkpoint runs/clip --dataset data/demo --out runs/clip/eval
    address-llava eval-clip --model addressclip-tiny --dataset data/demo --out runs/zero-shot/eval  # zero-shot
    address-llava eval-clip --checkpoint runs/clip --dataset data/demo --style street --out runs/clip/eval-street
    address-llava eval-clip --checkpoint runs/clip --dataset data/demo --candidates my_addresses.txt --out ...

Each image of `--split` is scored by cosine similarity against every candidate text (the gallery: every
distinct address of the city in `--style`, or a `--candidates` file; see `clip_stage.gallery`). Text
embeddings are computed once per (weights, gallery) and cached in memory and under `--cache-dir`.
Writes to `--out`:

    metrics.json        SSA-1/5, SA-1/5, neighbourhood-1, median/mean distance error (m), gallery, model
    predictions.jsonl   per image: image_id, truth, top-5 candidates with scores, rank of the right answer,
                        distance error
    map.png             right (green) and wrong (red) top-1 answers over the sub-street network

`--out` follows the output-folder rule of `clip_stage.core.outdir`, checked with every other input before the
model loads: it is never an input, inside the dataset or inside a checkpoint folder (its manifest would then
list extra files and refuse to load); it may sit in a train-clip run folder beside the checkpoints
(`runs/clip/eval`). An earlier eval-clip folder is replaced without `--overwrite` (results are cheap to
recompute); any other non-empty folder is refused. The files are written into a temporary folder that
replaces `--out` only once complete.

Metric definitions for every gallery style are in `clip_stage.geo_metrics`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_dir, atomic_write_json, atomic_write_text, resolve_under_root
from clip_stage.core.outdir import check_out_dir, on_disk, write_marker
from clip_stage.gallery import (Gallery, GalleryEncoder, default_cache_dir, encode_in_batches, gallery_from_dataset,
                                gallery_from_file)
from clip_stage.geo_metrics import candidate_geometries, score, sub_street_geometries_utm
from clip_stage.model import add_model_source_args, bundle_from_args, check_model_source, checkpoint_folders
from clip_stage.core.schema import (ADDRESS_STYLES, SPLITS, Address, DatasetPaths, check_record_images, read_records,
                                    render_address)
from clip_stage.plots import plot_prediction_map

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
MAP_FILE = "map.png"
TABLE_METRICS = ("SSA-1", "SSA-5", "SA-1", "SA-5", "neighbourhood-1", "median_distance_m")
KIND = "eval-clip"
# What eval folders held before output markers existed (the demo's clip/eval): adopted as eval-clip's own.
LEGACY_FILES = (METRICS_FILE, PREDICTIONS_FILE)


class EvalError(ValueError):
    """A bad eval-clip request: an option out of range, or a split with no images to evaluate."""


def split_records(dataset_dir: str | Path, split: str, limit: int | None = None):
    """The records of `split` (the first `limit`); refuses a limit below 1 and an empty selection."""
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1 (got {limit})")
    df = read_records(dataset_dir, split)
    if limit is not None:
        df = df.iloc[:limit]
    if df.empty:
        raise EvalError(f"{dataset_dir}: split {split!r} has no images")
    return df


def primary_metric(gallery: Gallery) -> str:
    """The metric a gallery can answer: SSA-1 for sub-street-level texts, SA-1 for street-level, else neighbourhood."""
    d = gallery.describe()
    n = max(d["num_candidates"], 1)
    if d["single_sub_street"] >= 0.5 * n:
        return "SSA-1"
    if d["single_street"] >= 0.5 * n:
        return "SA-1"
    return "neighbourhood-1"


@torch.no_grad()
def encode_images(model, preprocess, image_root: Path, rel_paths: list[str], batch_size: int = 64,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """L2-normalised image embeddings [N, D] (float32, CPU)."""
    from PIL import Image

    def load(rel: str) -> torch.Tensor:
        with Image.open(resolve_under_root(image_root, rel)) as im:
            return preprocess(im.convert("RGB"))

    return encode_in_batches(model, rel_paths, batch_size, lambda chunk: model.encode_image(
        torch.stack([load(rel) for rel in chunk]).to(device), normalize=True))


def evaluate(bundle, dataset_dir: str | Path, out_dir: str | Path | None = None, *, split: str = "test",
             gallery: Gallery | None = None, style: str = "full", batch_size: int = 64,
             encoder: GalleryEncoder | None = None, device: str | torch.device = "cpu", top_k: int = 5,
             plot: bool = True, limit: int | None = None, model_key: str | None = None) -> dict:
    """Evaluates `bundle` (clip_stage.model.ClipBundle) and returns the metrics; when out_dir is set, writes the
    files into a new folder that replaces out_dir as a whole once complete (the caller checks out_dir first)."""
    dataset_dir = Path(dataset_dir)
    if batch_size < 1 or top_k < 1:
        raise EvalError(f"batch size and top-k must be >= 1 (got {batch_size}, {top_k})")
    df = split_records(dataset_dir, split, limit)
    gallery = gallery if gallery is not None else gallery_from_dataset(dataset_dir, style)
    encoder = encoder if encoder is not None else GalleryEncoder(None, device=device)
    model = bundle.model.to(device)

    text_emb = encoder(model, bundle.tokenizer, gallery.texts, model_key=model_key)
    img_emb = encode_images(model, bundle.preprocess_val, DatasetPaths(dataset_dir).images, df["image"].tolist(),
                            batch_size, device)
    sims = img_emb @ text_emb.T
    k = min(top_k, len(gallery))
    top_scores, top_idx = sims.topk(k, dim=1)
    top_scores, top_idx = top_scores.numpy(), top_idx.numpy()

    geoms = sub_street_geometries_utm(dataset_dir)
    cand_geoms = candidate_geometries(gallery, geoms)
    truth = df[["image_id", "sub_street", "street", "neighbourhood", "utm_x", "utm_y"]].to_dict("records")
    per_image, metrics = score(truth, top_idx, gallery, cand_geoms)
    primary = primary_metric(gallery)
    metrics.update({
        "primary_metric": primary,
        "split": split,
        "num_candidates": len(gallery),
        "gallery": gallery.describe(),
        "model": {"model_name": bundle.model_name, "pretrained": bundle.pretrained},
        "dataset": str(dataset_dir),
        "cache": dict(encoder.stats),
    })
    if out_dir is None:
        return metrics

    with atomic_dir(out_dir) as tmp:
        _write_outputs(tmp, bundle, dataset_dir, df, split, gallery, style, truth, per_image, top_idx, top_scores,
                       metrics, geoms, cand_geoms, plot)
    return metrics


def _write_outputs(out_dir: Path, bundle, dataset_dir: Path, df, split: str, gallery: Gallery, style: str, truth,
                   per_image, top_idx, top_scores, metrics: dict, geoms, cand_geoms, plot: bool) -> None:
    """predictions.jsonl, metrics.json, map.png and the eval-clip marker, into the (temporary) folder out_dir."""
    truth_style = style if gallery.source.startswith("style:") else "full"
    lines = []
    for i, (t, r) in enumerate(zip(truth, per_image)):
        row = df.iloc[i]
        lines.append(json.dumps({
            "image_id": str(t["image_id"]),
            "truth": {"sub_street": t["sub_street"], "street": t["street"], "neighbourhood": t["neighbourhood"],
                      "address": _render_truth(row, truth_style), "utm_x": float(t["utm_x"]), "utm_y": float(t["utm_y"])},
            "top": [{"address": gallery.candidates[j].text, "score": float(s),
                     "sub_streets": sorted(gallery.candidates[j].sub_streets)}
                    for j, s in zip(top_idx[i], top_scores[i])],
            **r,
        }, ensure_ascii=False))
    atomic_write_text(out_dir / PREDICTIONS_FILE, "\n".join(lines) + "\n")
    atomic_write_json(out_dir / METRICS_FILE, metrics)
    if plot:
        primary = metrics["primary_metric"]
        rank_key = {"SSA-1": "ssa_rank", "SA-1": "sa_rank"}.get(primary)
        correct = np.array([(r[rank_key] == 0) if rank_key else r["neighbourhood_ok"] for r in per_image])
        pts = df[["utm_x", "utm_y"]].to_numpy(dtype=float)
        title = (f"{bundle.model_name} on {dataset_dir.name}/{split}, gallery {gallery.source} ({len(gallery)}): "
                 f"{primary} {100 * metrics[primary]:.1f}%")
        med = metrics["median_distance_m"]
        if med is not None:
            title += f", median error {med:.0f} m"
        plot_prediction_map(out_dir / MAP_FILE, geoms, pts, correct, [cand_geoms[j] for j in top_idx[:, 0]],
                            title=title, metric_name=primary)
    write_marker(out_dir, KIND)


def _render_truth(row, style: str) -> str:
    col = f"address_{style}"
    return str(row[col]) if col in row.index else render_address(Address.from_row(row), style)


def format_table(rows: dict[str, dict], metrics=TABLE_METRICS) -> str:
    """Markdown table: one row per named metrics dict; accuracies in %, distances in m."""
    head = "| model | " + " | ".join(metrics) + " |"
    sep = "|---|" + "---:|" * len(metrics)
    body = []
    for name, m in rows.items():
        cells = []
        for key in metrics:
            v = m.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("-")
            elif key.endswith("_m"):
                cells.append(f"{v:.0f}")
            else:
                cells.append(f"{100 * v:.1f}")
        body.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="address-llava eval-clip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(p, "evaluate it zero-shot (no fine-tuning)")
    p.add_argument("--dataset", required=True, help="address dataset folder (records.parquet, sub_streets.geojson)")
    p.add_argument("--split", default="test", choices=SPLITS, help="split to evaluate")
    p.add_argument("--style", "--address-style", default="full", choices=sorted(ADDRESS_STYLES),
                   help="address style of the gallery texts (every distinct address of the city)")
    p.add_argument("--candidates", default=None,
                   help="candidate file instead of --style: one address per line, or JSONL with address + "
                        "sub_street(s)/street/neighbourhood")
    p.add_argument("--out", required=True, help="output folder (metrics.json, predictions.jsonl, map.png)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--text-batch-size", type=int, default=256, help="gallery texts per forward pass")
    p.add_argument("--cache-dir", default=None, help=f"gallery embedding cache (default {default_cache_dir()})")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk gallery cache")
    p.add_argument("--top-k", type=int, default=5, help="candidates kept per image in predictions.jsonl")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images of the split")
    p.add_argument("--no-plot", action="store_true", help="skip map.png")
    p.add_argument("--device", default="cpu", help="torch device")
    return p


def check_options(args) -> None:
    """The numeric options, before anything is read."""
    for flag, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size),
                        ("--text-batch-size", args.text_batch_size), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise EvalError(f"{flag} must be >= 1 (got {value})")


def check_out(args) -> None:
    """--out by the one output-folder rule (module docstring): never an input nor inside a checkpoint folder; an
    earlier eval-clip folder is replaced."""
    inputs = [args.dataset, DatasetPaths(args.dataset).images, args.candidates, on_disk(args.pretrained)]
    run = None
    if args.checkpoint:
        folders, run = checkpoint_folders(args.checkpoint)
        inputs += [args.checkpoint, *folders]
    check_out_dir(args.out, KIND, inputs=inputs, inside_ok=[run], overwrite=True, legacy=LEGACY_FILES)


@command_main("eval-clip")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Every input and --out first: the model loads only for a request that can be evaluated and written.
    check_options(args)
    check_record_images(args.dataset, split_records(args.dataset, args.split, args.limit))
    gallery = gallery_from_file(args.candidates, args.dataset) if args.candidates else gallery_from_dataset(args.dataset, args.style)
    check_out(args)
    check_model_source(args)
    bundle = bundle_from_args(args, device=args.device)
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    encoder = GalleryEncoder(cache, batch_size=args.text_batch_size, device=args.device)
    m = evaluate(bundle, args.dataset, args.out, split=args.split, gallery=gallery, style=args.style,
                 batch_size=args.batch_size, encoder=encoder, device=args.device, top_k=args.top_k,
                 plot=not args.no_plot, limit=args.limit)
    name = args.checkpoint or f"{args.model} (zero-shot)"
    print(f"{m['num_images']} {args.split} images, {m['num_candidates']} candidates ({gallery.source})")
    print(format_table({name: m}))
    print(f"wrote {Path(args.out) / METRICS_FILE}, {PREDICTIONS_FILE}" + ("" if args.no_plot else f", {MAP_FILE}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
