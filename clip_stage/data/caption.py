"""Fill a dataset's `caption` column with a BLIP captioning model (command `address-llava caption`).

    address-llava caption --dataset DATA                      # paper: BLIP large, prompt "a street view of"
    address-llava caption --dataset DATA --model /path/to/blip --batch-size 32 --device cuda

The model is any `BlipForConditionalGeneration` + `BlipProcessor`, by hub id or local folder. Rows that
already have a caption are skipped (pass --overwrite to redo them), and records.parquet is rewritten
atomically every --save-every batches and at the end, so an interrupted run resumes where it stopped.
Captions start with the prompt, as conditional BLIP captions do ("a street view of ...").
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clip_stage.core.config import ALIASES, ConfigParser, Section
from clip_stage.core.errors import command_main
from clip_stage.core.fs import atomic_write_json, atomic_write_with, resolve_under_root
from clip_stage.core.outdir import check_model_folder
from clip_stage.core.progress import progress as tqdm  # a line every 30 s when not on a terminal
from clip_stage.core.schema import SPLITS, DatasetPaths, empty_captions, read_info, read_records, write_records
from clip_stage.core.training import check_device

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"
DEFAULT_PROMPT = "a street view of"


@dataclass(frozen=True)
class CaptionArgs:
    """What to caption and with which BLIP model."""

    dataset: str = ""
    """Dataset folder (records.parquet + images/); its caption column is filled in place."""
    model: str = DEFAULT_CAPTIONER
    """BLIP captioning model: hub id or local folder (BlipForConditionalGeneration + BlipProcessor)."""
    prompt: str = DEFAULT_PROMPT
    """Text prefix the caption continues (paper: 'a street view of'); '' for unconditional captions."""
    split: str | None = None
    """Caption only this split (unset: every row)."""
    batch_size: int = 16
    """Images per generate() call."""
    max_new_tokens: int = 40
    """Longest continuation in tokens (paper: captions of 10-30 words)."""
    min_new_tokens: int = 8
    """Shortest continuation in tokens."""
    num_beams: int = 3
    """Beam search width (1: greedy)."""
    device: str = "auto"
    """cuda / cpu / auto."""
    dtype: str = field(default="auto", metadata={ALIASES: ("torch-dtype",)})
    """float32 / bfloat16 / float16 / auto (float16 on CUDA, else float32)."""
    save_every: int = 20
    """Rewrite records.parquet every N batches (progress survives an interruption)."""
    overwrite: bool = False
    """Re-caption rows that already have a caption."""
    limit: int | None = None
    """Caption at most this many rows in this run (the rest on the next run)."""
    progress: bool = field(default=True, metadata={ALIASES: ("progress-bar",)})
    """Show a tqdm progress bar (--no-progress-bar hides it)."""

    def __post_init__(self):
        if not self.dataset:
            raise ValueError("--dataset is required")
        if self.batch_size < 1 or self.save_every < 1:
            raise ValueError("--batch-size and --save-every must be >= 1")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"--split {self.split!r}: one of {', '.join(SPLITS)} (unset: every row)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit}: must be at least 1 (unset: every row)")
        for flag, value in (("--max-new-tokens", self.max_new_tokens), ("--num-beams", self.num_beams)):
            if value < 1:
                raise ValueError(f"{flag} {value}: must be at least 1")


def _write_records_atomic(df, path: Path) -> None:
    atomic_write_with(path, lambda tmp: write_records(df, tmp))


class CaptionerError(ValueError):
    """A --model that is no BLIP captioning model (a user error: one line, exit 2)."""


def load_captioner(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, processor) of a BLIP captioning checkpoint (hub id or local folder)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    check_model_folder(model, "--model")
    if os.path.isdir(model):
        model_type = json.loads((Path(model) / "config.json").read_text(encoding="utf-8")).get("model_type")
        if model_type != "blip":  # transformers would load it anyway, with fresh random BLIP weights
            raise CaptionerError(f"--model {model}: a {model_type!r} model, not a BLIP captioner")
    try:
        processor = BlipProcessor.from_pretrained(model)
        net = BlipForConditionalGeneration.from_pretrained(model, dtype=dtype).to(device).eval()
    except OSError as e:  # a folder of another model, or a hub id that cannot be fetched
        raise CaptionerError(f"--model {model}: cannot load a BLIP captioner ({str(e).splitlines()[0]})") from e
    return net, processor


@torch.no_grad()
def caption_images(net, processor, images, prompt: str, max_new_tokens: int = 40, min_new_tokens: int = 8,
                   num_beams: int = 3) -> list[str]:
    """Captions a list of PIL images."""
    kwargs = {"text": [prompt] * len(images)} if prompt else {}
    inputs = processor(images=images, return_tensors="pt", **kwargs).to(net.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(net.dtype)
    out = net.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams)
    return [" ".join(t.split()) for t in processor.batch_decode(out, skip_special_tokens=True)]


def run(args: CaptionArgs) -> dict:
    """Captions the rows that need it; returns counts {"captioned", "skipped", "remaining"}."""
    from PIL import Image

    paths = DatasetPaths(args.dataset)
    df = read_records(args.dataset)
    todo_mask = empty_captions(df) if not args.overwrite else np.ones(len(df), dtype=bool)
    if args.split is not None:
        todo_mask = todo_mask & (df["split"] == args.split).to_numpy()
    todo = [int(i) for i in df.index[todo_mask]]
    skipped = int((~todo_mask).sum())
    if args.limit is not None:
        todo = todo[: args.limit]
    if not todo:
        print(f"caption: nothing to do ({skipped} rows already captioned)")
        return {"captioned": 0, "skipped": skipped, "remaining": 0}

    check_device(args.device)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype if args.dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    net, processor = load_captioner(args.model, device, getattr(torch, dtype_name))
    captions = df["caption"].fillna("").astype(str).tolist()
    done = 0
    bar = tqdm(total=len(todo), desc="caption", disable=not args.progress, dynamic_ncols=True)
    for b, start in enumerate(range(0, len(todo), args.batch_size)):
        rows = todo[start:start + args.batch_size]
        images = []
        for i in rows:
            with Image.open(resolve_under_root(paths.images, str(df.at[i, "image"]))) as im:
                images.append(im.convert("RGB"))
        texts = caption_images(net, processor, images, args.prompt, args.max_new_tokens, args.min_new_tokens,
                               args.num_beams)
        for i, t in zip(rows, texts):
            captions[i] = t or args.prompt  # never write '' (it would read as "not captioned")
        done += len(rows)
        bar.update(len(rows))
        if (b + 1) % args.save_every == 0:
            _write_records_atomic(df.assign(caption=captions), paths.records)
    bar.close()
    _write_records_atomic(df.assign(caption=captions), paths.records)
    try:
        info = read_info(args.dataset)
        info["captions"] = {"model": args.model, "prompt": args.prompt, "num_beams": args.num_beams,
                            "max_new_tokens": args.max_new_tokens}
        atomic_write_json(paths.info, info)
    except ValueError:
        pass  # no/odd dataset_info.json: captions are written, provenance is best-effort
    remaining = int(empty_captions(df.assign(caption=captions)).sum())
    print(f"caption: {done} rows captioned, {skipped} skipped, {remaining} left without a caption")
    return {"captioned": done, "skipped": skipped, "remaining": remaining}


@command_main("caption")
def main(argv: list[str] | None = None) -> int:
    parser = ConfigParser([Section("caption", CaptionArgs)], prog="address-llava caption", description=__doc__.split("\n\n")[0])
    args = parser.parse_config(argv)["caption"]
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
