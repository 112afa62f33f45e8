"""AddressCLIP candidate addresses for candidate-grounded LLaVA answers, cross-fitted on the training split.

    address-llava candidates --checkpoint runs/clip --dataset data/city --out data/city_candidates \
        [--folds 2] [--top-k 5] [--style full]

A candidate-grounded LLaVA reads AddressCLIP's top-K addresses in its first user turn (format:
`conversations.candidates`) and learns to pick, re-rank, or say that none fits. That only works if the
candidates it trains with look like the ones it will see at inference: there, AddressCLIP ranks photos it
never trained on, so the truth is sometimes second, or missing. Ranking training photos with the model that
was trained on them would put the truth first almost always, and the LLaVA would learn to copy candidate 1.

So the candidates of training images are **cross-fitted**: the training split is cut into `--folds` folds by
a hash of the image id; for each fold, a copy of the AddressCLIP run (same recorded train-clip settings,
`--holdout-fold k/n`, and as many optimiser steps: epochs x n/(n-1)) trains on the other folds and ranks the
held-out fold. Images of the other splits (val,
test) are ranked by the given, fully trained model, which never saw them. No candidate list is ever built
from the image's own label. `candidates_info.json` reports top-1 / top-K accuracy per source, so one can check
that the training candidates are about as good as the test ones (fold models see (n-1)/n of the data).

Outputs (folder `--out`, its own kind: `candidates_info.json` marks it):
    candidates.jsonl        {"image_id", "split", "source", "candidates": [{"address", "sub_streets", "score"}]}
    candidates_info.json    settings, per-source counts and accuracy
    fold-K/                 the fold models' train-clip runs (resumed if interrupted)
    folds.json              what each fold model is trained from (checkpoint, its train-clip config, dataset
                            path and records sha256, fold k of n)

A rerun into the same `--out` reuses (or resumes) a fold model only when it was trained from the same settings:
its recorded train-clip config (checkpoint's settings, dataset, fold k/n, epochs, seed, ...) and the dataset's
records must match, else the run is refused naming what differs (nothing is deleted): a fold model of another
configuration may have trained on the very images it would rank. Options are checked before anything trains.

`AddressRanker` is also what `infer`, `chat`, `benchmark` and `web-demo` use at inference: the top-K of a
photo against the city's address gallery, whose text embeddings are cached (`clip_stage.gallery`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from clip_stage.core.config import ArgumentParser, str2bool
from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_write_json, iter_jsonl, remove_stale_temps, sha256_file
from clip_stage.core.outdir import check_out_dir, write_marker
from clip_stage.core.schema import ADDRESS_STYLES, SPLITS, DatasetPaths, read_records, records_fingerprint
from clip_stage.evaluate import encode_images
from clip_stage.gallery import GalleryEncoder, default_cache_dir, gallery_from_dataset
from clip_stage.model import CONFIG_FILE, create_clip, latest_checkpoint, load_checkpoint, read_checkpoint_config
from clip_stage.train import resume_mismatches, train
from clip_stage.train_config import TrainConfig
from clip_stage.train_data import fold_of

log = logging.getLogger(__name__)

INFO_FILE = "candidates_info.json"
CANDIDATES_FILE = "candidates.jsonl"
FOLDS_FILE = "folds.json"


class CandidatesError(ValueError):
    """A user error: missing checkpoint or dataset, bad options, an output folder of another kind."""


class AddressRanker:
    """AddressCLIP over the city's address gallery: the top-k addresses of photos, with their sub-streets."""

    def __init__(self, bundle, dataset_dir: str | os.PathLike, style: str = "full", device: str = "cpu",
                 cache_dir: str | os.PathLike | None = None):
        self.bundle = bundle
        self.device = device
        self.gallery = gallery_from_dataset(dataset_dir, style)
        cache = default_cache_dir() if cache_dir is None else cache_dir
        self.text_emb = GalleryEncoder(cache, device=device)(bundle.model, bundle.tokenizer, self.gallery.texts)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, dataset_dir, style: str = "full", device: str = "cpu"):
        return cls(load_checkpoint(checkpoint, device=device), dataset_dir, style, device)

    @classmethod
    def from_args(cls, checkpoint: str | None, model: str | None, pretrained: str | None, dataset_dir, device="cpu"):
        bundle = load_checkpoint(checkpoint, device=device) if checkpoint else create_clip(model, pretrained, device=device)
        return cls(bundle, dataset_dir, device=device)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence) -> torch.Tensor:
        model = self.bundle.model.eval()
        pix = torch.stack([self.bundle.preprocess_val(im) for im in images]).to(self.device)
        return model.encode_image(pix, normalize=True).float().cpu()

    @torch.no_grad()
    def rank(self, image_emb: torch.Tensor, k: int) -> list[list[dict]]:
        """Top-k gallery entries per image embedding row: address, sub_streets, similarity, probability."""
        sims = image_emb @ self.text_emb.T
        model = self.bundle.model
        scale = float(model.logit_scale.exp()) if hasattr(model, "logit_scale") else 100.0
        probs = torch.softmax(sims * scale, dim=1)
        k = min(k, sims.shape[1])
        top = torch.topk(sims, k, dim=1).indices.tolist()
        return [[{"rank": r + 1, "address": self.gallery.candidates[i].text,
                  "sub_streets": sorted(self.gallery.candidates[i].sub_streets),
                  "similarity": round(float(sims[row, i]), 4), "probability": round(float(probs[row, i]), 4)}
                 for r, i in enumerate(idx)] for row, idx in enumerate(top)]

    def top_k_batch(self, images: Sequence, k: int = 5) -> list[list[dict]]:
        return self.rank(self.image_embeddings(images), k)

    def top_k(self, image, k: int = 5) -> list[dict]:
        return self.top_k_batch([image], k)[0]


# --- cross-fitting -------------------------------------------------------------------------------------

def fold_train_config(checkpoint: str | os.PathLike, dataset: str, fold: int, folds: int, out_dir: Path,
                      progress: bool = False):
    """The recorded train-clip config of `checkpoint`, retargeted to train without fold `fold` of `folds`."""
    recorded = read_checkpoint_config(checkpoint).get("train_config")
    if not recorded:
        raise CandidatesError(f"{checkpoint}: no recorded train-clip config (clip_config.json 'train_config'); "
                              "cross-fitting retrains with the same settings, so it needs a train-clip run")
    cfg = TrainConfig.from_dict(recorded)
    # As many optimiser steps as the full run (a fold model sees (n-1)/n of the images per epoch): fewer steps
    # would make the training candidates clearly worse than the test ones (measured on the demo city).
    epochs = math.ceil(cfg.optim.num_epochs * folds / (folds - 1))
    return dataclasses.replace(
        cfg,
        optim=dataclasses.replace(cfg.optim, num_epochs=epochs),
        data=dataclasses.replace(cfg.data, dataset=str(dataset), holdout_fold=f"{fold}/{folds}"),
        run=dataclasses.replace(cfg.run, output_dir=str(out_dir / f"fold-{fold}"), resume="latest", stop_at_step=None,
                                progress_bar=progress,
                                report_to=tuple(n for n in cfg.run.report_to if n != "tensorboard")),
    )


def check_options(folds: int, top_k: int, style: str, splits: Sequence[str]) -> list[str]:
    """The splits to rank (deduplicated), after checking every option: nothing may train before a bad one."""
    if folds < 2:
        raise CandidatesError(f"--folds {folds}: cross-fitting needs at least 2 folds")
    if top_k < 1:
        raise CandidatesError(f"--top-k {top_k}: must be >= 1")
    if style not in ADDRESS_STYLES:
        raise CandidatesError(f"--style {style!r}: unknown address style; valid: {', '.join(sorted(ADDRESS_STYLES))}")
    splits = list(dict.fromkeys(s.strip() for s in splits if s.strip()))
    if not splits:
        raise CandidatesError(f"--splits: no split given; valid: {', '.join(SPLITS)}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise CandidatesError(f"--splits: unknown split(s) {', '.join(map(repr, unknown))}; valid: {', '.join(SPLITS)}")
    return splits


def fold_source(checkpoint, dataset: Path, records_sha256: str, cfg: TrainConfig, fold: int, folds: int) -> dict:
    """What fold model `fold` is trained from (folds.json): reuse is allowed only when this is unchanged."""
    return {"checkpoint": os.path.realpath(checkpoint), "dataset": os.path.realpath(dataset),
            "records_sha256": records_sha256, "fold": fold, "folds": folds, "train_config": cfg.to_dict()}


def _recorded_fold_config(fold_dir: Path) -> dict | None:
    """The train-clip config a fold run recorded (final/, else its newest checkpoint), None before any save."""
    done = fold_dir / "final" / CONFIG_FILE
    ckpt = done if done.is_file() else (latest / CONFIG_FILE if (latest := latest_checkpoint(fold_dir)) else None)
    if ckpt is None:
        return None
    return json.loads(ckpt.read_text(encoding="utf-8")).get("train_config") or {}


def fold_mismatches(fold_dir: Path, cfg: TrainConfig, source: dict, recorded: dict | None) -> list[str]:
    """What an existing fold run differs in from the one wanted (`recorded`: its folds.json entry, if any)."""
    out = []
    saved = _recorded_fold_config(fold_dir)
    if saved is not None:
        out += resume_mismatches(saved, cfg)
    for key in ("records_sha256", "folds", "fold"):
        if recorded and key in recorded and recorded[key] != source[key]:
            what = "dataset records (sha256)" if key == "records_sha256" else key
            out.append(f"{what}: was {recorded[key]!r}, now {source[key]!r}")
    return out


def _read_fold_sources(out: Path) -> dict:
    path = out / FOLDS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError(f"expected an object, got {type(data).__name__}")
    except (ValueError, TypeError) as e:
        raise CandidatesError(f"{path}: unreadable ({e}); cannot tell what the fold models were trained from") from None
    return data


def plan_folds(checkpoint, dataset: Path, out: Path, folds: int, progress: bool) -> tuple[list[TrainConfig], dict]:
    """Each fold's train-clip config and source; refuses (before anything trains) to reuse a fold run that was
    trained from other settings."""
    recorded = _read_fold_sources(out)
    records_sha256 = sha256_file(DatasetPaths(dataset).records)  # the same path may hold a rebuilt dataset
    cfgs, sources = [], {}
    for k in range(1, folds + 1):
        # The real path: a rerun from another folder names the same dataset.
        cfg = fold_train_config(checkpoint, os.path.realpath(dataset), k, folds, out, progress)
        name = f"fold-{k}"
        sources[name] = fold_source(checkpoint, dataset, records_sha256, cfg, k, folds)
        differ = fold_mismatches(Path(cfg.run.output_dir), cfg, sources[name], recorded.get(name))
        if differ:
            raise CandidatesError(f"{out / name} holds a fold model trained from other settings ({'; '.join(differ)}); "
                                  "its candidates would not be cross-fitted: use another --out (nothing was deleted)")
        cfgs.append(cfg)
    return cfgs, sources


def _encode_split_images(ranker: AddressRanker, image_root: Path, rel_paths: list[str], batch_size: int = 64):
    return encode_images(ranker.bundle.model, ranker.bundle.preprocess_val, image_root, rel_paths, batch_size,
                         ranker.device)


def _accuracy(rows: list[dict], truth: dict[str, str]) -> dict:
    n = len(rows)
    top1 = sum(truth[r["image_id"]] in r["candidates"][0]["sub_streets"] for r in rows if r["candidates"])
    topk = sum(any(truth[r["image_id"]] in c["sub_streets"] for c in r["candidates"]) for r in rows)
    return {"images": n, "top1": round(top1 / n, 4) if n else None, "top_k_recall": round(topk / n, 4) if n else None}


def cross_fit_candidates(checkpoint: str | os.PathLike, dataset: str | os.PathLike, out: str | os.PathLike,
                         folds: int = 2, top_k: int = 5, style: str = "full", splits: Sequence[str] = ("train", "val", "test"),
                         device: str = "cpu", progress: bool = False) -> dict:
    """Trains the fold models (resuming), ranks every image of `splits`, writes the outputs; returns the info."""
    out, dataset = Path(out), Path(dataset)
    splits = check_options(folds, top_k, style, splits)
    if not Path(checkpoint).exists():
        raise CandidatesError(f"--checkpoint {checkpoint}: not found")
    if not DatasetPaths(dataset).records.is_file():
        raise CandidatesError(f"--dataset {dataset}: not a dataset folder (no records.parquet)")
    # One rule for every command's --out (clip_stage.core.outdir): an earlier candidates folder is continued (its
    # fold runs resume); anything else non-empty, or a folder that is or holds an input, is refused.
    check_out_dir(out, "candidates", resume=True, legacy=[INFO_FILE, "fold-1", "candidates.jsonl"],
                  inputs=[checkpoint, dataset, DatasetPaths(dataset).images])
    records = read_records(dataset)
    truth = dict(zip(records["image_id"].astype(str), records["sub_street"].astype(str)))
    image_root = DatasetPaths(dataset).images
    fold_cfgs, sources = plan_folds(checkpoint, dataset, out, folds, progress) if "train" in splits else ([], {})
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, (CANDIDATES_FILE,))  # a killed run's half-written .candidates.jsonl.<pid>.tmp
    write_marker(out, "candidates")
    if sources:  # before a fold trains: a killed run's partial fold models are checked on the rerun too
        atomic_write_json(out / FOLDS_FILE, {**_read_fold_sources(out), **sources})
    rows: list[dict] = []
    train_df = records[records["split"] == "train"]
    fold_ids = fold_of(train_df["image_id"].astype(str).tolist(), folds)
    if "train" in splits:
        for k, cfg in enumerate(fold_cfgs, 1):
            final = Path(cfg.run.output_dir) / "final"
            if not (final / "model.safetensors").exists():
                log.info("candidates: training fold model %d/%d (%s)", k, folds, cfg.run.output_dir)
                train(cfg)
            ranker = AddressRanker(load_checkpoint(final, device=device), dataset, style, device)
            held = train_df[fold_ids == k]
            emb = _encode_split_images(ranker, image_root, held["image"].astype(str).tolist())
            for image_id, split, cands in zip(held["image_id"].astype(str), held["split"], ranker.rank(emb, top_k)):
                rows.append({"image_id": image_id, "split": split, "source": f"fold-{k}/{folds}", "candidates": cands})
    others = records[records["split"].isin([s for s in splits if s != "train"])]
    if len(others):
        ranker = AddressRanker(load_checkpoint(checkpoint, device=device), dataset, style, device)
        emb = _encode_split_images(ranker, image_root, others["image"].astype(str).tolist())
        for image_id, split, cands in zip(others["image_id"].astype(str), others["split"], ranker.rank(emb, top_k)):
            rows.append({"image_id": image_id, "split": split, "source": "full", "candidates": cands})
    by_source: dict[str, list[dict]] = {}
    for r in rows:
        by_source.setdefault("train (cross-fitted)" if r["source"] != "full" else f"{r['split']} (full model)", []).append(r)
    info = {"checkpoint": str(checkpoint), "dataset": str(dataset.resolve()),
            "records_fingerprint": records_fingerprint(records), "folds": folds, "top_k": top_k, "style": style,
            "splits": list(splits), "images": len(rows),
            "accuracy": {src: _accuracy(rs, truth) for src, rs in sorted(by_source.items())}}
    tmp = out / f".{CANDIDATES_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / CANDIDATES_FILE)
    atomic_write_json(out / INFO_FILE, info)
    return info


def read_candidates(path: str | os.PathLike) -> dict[str, list[dict]]:
    """image_id -> candidate list, from a candidates folder or its candidates.jsonl; errors name the line."""
    path = Path(path)
    if path.is_dir():
        path = path / CANDIDATES_FILE
    if not path.is_file():
        raise CandidatesError(f"{path}: candidates file not found (write it with `address-llava candidates`)")
    out: dict[str, list[dict]] = {}
    for line in iter_jsonl(path):
        try:
            if line.error is not None:
                raise ValueError(line.error)
            row = line.value
            cands = row["candidates"]
            if not isinstance(cands, list) or not all(isinstance(c, dict) and c.get("address") for c in cands):
                raise ValueError("'candidates' must be a list of {address, ...}")
            out[str(row["image_id"])] = cands
        except (KeyError, TypeError, ValueError) as e:
            raise CandidatesError(f"{path}:{line.lineno}: not a candidates line ({e})") from None
    return out


def check_candidates_match(path: str | os.PathLike, dataset: str | os.PathLike, records) -> None:
    """Refuses candidates ranked for another dataset (same image ids, other pictures or splits: a fold model
    would have seen the image, or the lists belong to other photos). Read from candidates_info.json's
    fingerprint; a folder from before it is checked by each image's split."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    info_path = folder / INFO_FILE
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    recorded = info.get("records_fingerprint")
    if recorded is not None:
        if recorded != records_fingerprint(records):
            raise CandidatesError(f"{path}: ranked for another dataset ({info.get('dataset')}: other images, splits or "
                                  f"labels than {dataset}); run `address-llava candidates --dataset {dataset}`")
        return
    split_of = dict(zip(records["image_id"].astype(str), records["split"].astype(str)))
    file = folder / CANDIDATES_FILE
    for line in iter_jsonl(file) if file.is_file() else ():
        row = line.value if isinstance(line.value, dict) else {}
        image_id, split = str(row.get("image_id")), row.get("split")
        if image_id in split_of and split is not None and split != split_of[image_id]:
            raise CandidatesError(f"{file}:{line.lineno}: image {image_id} is {split} there but {split_of[image_id]} "
                                  f"in {dataset}: these candidates were ranked for another dataset")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="address-llava candidates", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the train-clip run whose settings the fold models repeat, "
                                                       "and which ranks the val/test images")
    p.add_argument("--dataset", required=True, help="address dataset folder (the one the run trained on)")
    p.add_argument("--out", required=True, help="output folder (candidates.jsonl, candidates_info.json, fold-K/)")
    p.add_argument("--folds", type=int, default=2, help="cross-fitting folds of the training split (>= 2)")
    p.add_argument("--top-k", type=int, default=5, help="candidate addresses per image")
    p.add_argument("--style", "--address-style", default="full", help="address style of the gallery (clip_stage.core.schema.ADDRESS_STYLES)")
    p.add_argument("--splits", default="train,val,test", help="splits to rank (comma list)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--progress-bar", "--progress", dest="progress", type=str2bool, nargs="?", const=True,
                   default=False, metavar="BOOL", help="progress bars of the fold trainings (default off)")
    p.add_argument("--no-progress-bar", "--no-progress", dest="progress", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", help="show the traceback of user errors too (taken by the "
                                                        "command guard, clip_stage.core.errors)")
    return p


@command_main("candidates")
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    # User errors go to the guard (command_main): `candidates: error: ...`, exit 2; --debug shows the traceback.
    info = cross_fit_candidates(args.checkpoint, args.dataset, args.out, args.folds, args.top_k, args.style,
                                args.splits.split(","), args.device, args.progress)
    for src, acc in info["accuracy"].items():
        print(f"{src}: {acc['images']} images, top-1 {100 * (acc['top1'] or 0):.1f}%, "
              f"top-{info['top_k']} recall {100 * (acc['top_k_recall'] or 0):.1f}%")
    print(f"wrote {Path(args.out) / CANDIDATES_FILE}")
    return 0


__all__ = ["AddressRanker", "CandidatesError", "cross_fit_candidates", "fold_train_config", "read_candidates",
           "CANDIDATES_FILE", "FOLDS_FILE", "INFO_FILE", "check_candidates_match"]

if __name__ == "__main__":
    sys.exit(main())
