"""LLaVA-format conversation data -> model batches: dataset, image loading, collate, length-grouped sampler.

Reads any LLaVA-format file (a JSON list or JSONL of `{"id", "image", "conversations": [{"from", "value"}]}`,
as written by `address-llava conversations` or LLaVA's own data) through `conversations.records`. Every record's text is tokenised once at
start-up (gives exact lengths for length-grouped batching, and every malformed record is reported before
training starts, by id); for a file the results are cached on disk (`llava_address.length_cache`), so a
later run on the same file and settings skips the pass (minutes for LLaVA's 665k records). Images load
lazily in `__getitem__`, from paths relative to an image root that they cannot escape, padded to a square
with the processor's mean colour as LLaVA-1.5 does (`image_aspect_ratio pad`), then run through the
processor's image processor.

    ds = LlavaDataset.from_args(DataArgs(data_path=...), processor, num_image_tokens(model.config))
    sampler = LengthGroupedSampler(ds.lengths, ds.has_image, batch_size=4, seed=0)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=LlavaCollator(tokenizer.pad_token_id))
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from clip_stage.core.fs import UnsafePathError, resolve_under_root
from conversations.records import RecordError, load_records
from conversations.validate import Report, require_valid
from llava_address.config import DataArgs
from llava_address.length_cache import LengthCache, resolve_cache_dir
from llava_address import prompting
from llava_address.prompting import IGNORE_INDEX, ConversationError, encode_conversation, get_template

log = logging.getLogger(__name__)


# --- reading ---------------------------------------------------------------------------------------

def record_images(record: dict[str, Any], record_id: Any) -> list[str]:
    """The record's image paths (LLaVA allows one path or a list; none for text-only records)."""
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(x, str) for x in image):
        return list(image)
    raise RecordError(f"record {record_id!r}: `image` must be a path or a list of paths, got {image!r}")


# --- images ----------------------------------------------------------------------------------------

def expand_to_square(image, background: tuple[int, ...]):
    """Pads a PIL image to a centred square with `background` (LLaVA-1.5's expand2square)."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), background)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def mean_colour(image_processor) -> tuple[int, int, int]:
    """The padding colour: int(mean * 255), as LLaVA's expand2square and transformers' LlavaImageProcessor(do_pad)
    compute it, so a deployment that pads with either feeds the model exactly the training images."""
    return tuple(int(x * 255) for x in image_processor.image_mean)


def load_image(root: str | os.PathLike, relative: str, record_id: Any):
    """An RGB PIL image under `root`; RecordError naming the record for unsafe paths and unreadable files."""
    from PIL import Image, UnidentifiedImageError

    try:
        path = resolve_under_root(root, relative)
    except UnsafePathError as e:
        raise RecordError(f"record {record_id!r}: {e}") from e
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise RecordError(f"record {record_id!r}: image {relative!r} not found under {root}") from e
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise RecordError(f"record {record_id!r}: image {relative!r} is corrupt or unreadable: {e}") from e


# --- dataset ---------------------------------------------------------------------------------------

class LlavaDataset(Dataset):
    """Items: {"input_ids", "labels" (LongTensor [L]), "pixel_values" (FloatTensor [n_images, 3, H, W] or None),
    "id"}. `lengths[i]` is the exact token count of item i (image tokens included); `has_image[i]` its modality.
    With a `length_cache` (what `from_file` passes when given a cache folder) ids, lengths and modalities come
    from the cache when it holds them for these records and settings, and are written to it otherwise.
    """

    def __init__(self, records: Sequence[dict[str, Any]], processor, num_image_tokens: int, *,
                 image_root: str | os.PathLike | None, image_aspect_ratio: str = "pad", max_length: int = 2048,
                 template: str = "vicuna_v1", image_token_id: int | None = None, source: str = "records",
                 length_cache: LengthCache | None = None):
        if image_aspect_ratio not in ("pad", "resize"):
            raise ValueError("image_aspect_ratio must be 'pad' or 'resize'")
        self.records = list(records)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_processor = getattr(processor, "image_processor", None)
        self.num_image_tokens = num_image_tokens
        self.image_root = Path(image_root) if image_root is not None else None
        self.image_aspect_ratio = image_aspect_ratio
        self.max_length = max_length
        self.template = template
        self.image_token_id = image_token_id
        ids = [rec.get("id", f"#{i}") if isinstance(rec, dict) else f"#{i}" for i, rec in enumerate(self.records)]
        key = hit = None
        if length_cache is not None:
            key = length_cache.key(self.tokenizer, template=get_template(template), num_image_tokens=num_image_tokens,
                                   max_length=max_length, image_token_id=image_token_id,
                                   encoder_files=(prompting.__file__, __file__))
            hit = length_cache.load(key, ids)
        if hit is not None:
            self.ids, (self.lengths, self.has_image) = ids, hit
        else:
            self._tokenise_all(ids, source)  # raises RecordError before anything is cached
            if length_cache is not None:
                length_cache.save(key, self.ids, self.lengths, self.has_image)
        if any(self.has_image) and (self.image_root is None or self.image_processor is None):
            raise ValueError("records have images: give an image_root and a processor with an image processor")
        n_trunc = sum(1 for n in self.lengths if n >= max_length)
        if n_trunc:
            log.warning("%s: %d of %d records truncated to %d tokens", source, n_trunc, len(self), max_length)

    def _tokenise_all(self, ids: list[Any], source: str) -> None:
        """Fills ids/lengths/has_image by encoding every record; one RecordError listing all bad records."""
        self.ids, self.lengths, self.has_image = [], [], []
        problems = []
        for i, (rid, rec) in enumerate(zip(ids, self.records)):
            try:
                enc, images = self._encode(i, rec)
            except (RecordError, ConversationError) as e:
                problems.append(str(e))
                continue
            self.ids.append(rid)
            self.lengths.append(len(enc.input_ids))
            self.has_image.append(bool(images))
        if problems:
            shown = "\n  ".join(problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise RecordError(f"{source}: {len(problems)} of {len(self.records)} records are invalid:\n  {shown}{more}")

    @classmethod
    def from_file(cls, data_path: str | os.PathLike, processor, num_image_tokens: int,
                  image_root: str | os.PathLike | None = None, length_cache_dir: str | os.PathLike | None = None,
                  **kwargs) -> "LlavaDataset":
        """Reads a LLaVA JSON/JSONL file; image paths are relative to `image_root` (default: the file's folder).

        `length_cache_dir`: folder caching the start-up tokenisation pass (None: no cache).
        """
        data_path = Path(data_path)
        root = Path(image_root) if image_root is not None else data_path.parent
        # Identify the file before reading it: a file rewritten meanwhile then misses the cache next time.
        cache = LengthCache(length_cache_dir, data_path) if length_cache_dir is not None else None
        return cls(load_records(data_path), processor, num_image_tokens, image_root=root,
                   source=str(data_path), length_cache=cache, **kwargs)

    @classmethod
    def from_args(cls, args: DataArgs, processor, num_image_tokens: int, **kwargs) -> "LlavaDataset":
        if args.data_path is None:
            raise ValueError("DataArgs.data_path is required")
        return cls.from_file(args.data_path, processor, num_image_tokens, image_root=args.image_root,
                             image_aspect_ratio=args.image_aspect_ratio, max_length=args.model_max_length,
                             template=args.template, length_cache_dir=resolve_cache_dir(args.length_cache_dir),
                             **kwargs)

    def _encode(self, index: int, rec: Any):
        if not isinstance(rec, dict):
            raise RecordError(f"record #{index}: expected an object, got {type(rec).__name__}")
        rid = rec.get("id", f"#{index}")
        conv = rec.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise RecordError(f"record {rid!r}: `conversations` must be a non-empty list")
        images = record_images(rec, rid)
        if isinstance(conv[0], dict) and str(conv[0].get("from", conv[0].get("role"))).lower() in ("gpt", "assistant"):
            raise RecordError(f"record {rid!r}: the conversation starts with an assistant message")
        if conv and isinstance(conv[-1], dict) and str(conv[-1].get("from", conv[-1].get("role"))).lower() in ("human", "user"):
            raise RecordError(f"record {rid!r}: the conversation ends with a user message (nothing to learn)")
        enc = encode_conversation(conv, self.tokenizer, self.num_image_tokens, num_images=len(images),
                                  image_token_id=self.image_token_id, template=self.template,
                                  max_length=self.max_length, record_id=rid)
        return enc, images

    def __len__(self) -> int:
        return len(self.records)

    def load_pixel_values(self, images: Sequence[str], record_id: Any) -> torch.Tensor:
        pil = [load_image(self.image_root, rel, record_id) for rel in images]
        if self.image_aspect_ratio == "pad":
            bg = mean_colour(self.image_processor)
            pil = [expand_to_square(im, bg) for im in pil]
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        enc, images = self._encode(index, rec)
        rid = self.ids[index]
        pixel_values = self.load_pixel_values(images, rid) if images else None
        return {"input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
                "labels": torch.tensor(enc.labels, dtype=torch.long),
                "pixel_values": pixel_values, "id": rid}

    def verify_images(self) -> None:
        """Opens every image now (instead of lazily during training); RecordError lists the unusable ones."""
        problems = []
        for rid, rec in zip(self.ids, self.records):
            for rel in record_images(rec, rid):
                try:
                    load_image(self.image_root, rel, rid)
                except RecordError as e:
                    problems.append(str(e))
        if problems:
            raise RecordError(f"{len(problems)} unusable image(s):\n  " + "\n  ".join(problems[:10]))


# --- batching --------------------------------------------------------------------------------------

class LlavaCollator:
    """Right-pads a list of dataset items into model inputs.

    Returns input_ids / labels (pad: -100) / attention_mask [B, L] and, when any item has images,
    pixel_values [total_images, 3, H, W] in item order (the model fills image tokens in that order).
    `ids` (record ids) are returned only with `keep_ids=True`, since models reject unknown kwargs.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, keep_ids: bool = False):
        if pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.keep_ids = keep_ids

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(it["input_ids"]) for it in items)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        b = len(items)
        input_ids = torch.full((b, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, longest), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[i, :n] = it["input_ids"]
            labels[i, :n] = it["labels"]
            attention_mask[i, :n] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pixels = [it["pixel_values"] for it in items if it.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels, dim=0)
        if self.keep_ids:
            batch["ids"] = [it.get("id") for it in items]
        return batch


def length_grouped_indices(lengths: Sequence[int], has_image: Sequence[bool] | None, batch_size: int,
                           generator: torch.Generator, megabatch_mult: int = 50) -> list[int]:
    """A permutation in which every run of `batch_size` indices has similar lengths and one modality.

    Like LLaVA's group_by_modality_length / HF's LengthGroupedSampler: per modality (image / text-only),
    shuffle, cut into megabatches of `megabatch_mult * batch_size`, sort each by length (longest first) and cut
    it into batches; then shuffle the full batches, keep the longest batch first (an out-of-memory shows up at
    step 1) and put the incomplete leftovers of both modalities together at the end.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    n = len(lengths)
    modality = list(has_image) if has_image is not None else [True] * n
    groups = [[i for i in range(n) if modality[i]], [i for i in range(n) if not modality[i]]]
    full: list[list[int]] = []
    leftover: list[int] = []
    mega = megabatch_mult * batch_size
    for group in groups:
        if not group:
            continue
        perm = [group[j] for j in torch.randperm(len(group), generator=generator).tolist()]
        for s in range(0, len(perm), mega):
            chunk = sorted(perm[s:s + mega], key=lambda i: -lengths[i])
            for b in range(0, len(chunk), batch_size):
                batch = chunk[b:b + batch_size]
                (full.append(batch) if len(batch) == batch_size else leftover.extend(batch))
    order = torch.randperm(len(full), generator=generator).tolist()
    full = [full[j] for j in order]
    if full:
        longest = max(range(len(full)), key=lambda j: max(lengths[i] for i in full[j]))
        full[0], full[longest] = full[longest], full[0]
    leftover.sort(key=lambda i: -lengths[i])
    return [i for batch in full for i in batch] + leftover


class LengthGroupedSampler(Sampler[int]):
    """Sampler yielding `length_grouped_indices`; deterministic in (seed, epoch): call `set_epoch` each epoch.

    Give the per-device batch size: with accelerate, consecutive batches go to different ranks and all come
    from the same megabatch, so every rank sees similar lengths at a step.
    """

    def __init__(self, lengths: Sequence[int], has_image: Sequence[bool] | None, batch_size: int, seed: int = 0,
                 megabatch_mult: int = 50):
        self.lengths = list(lengths)
        self.has_image = list(has_image) if has_image is not None else None
        self.batch_size = batch_size
        self.seed = seed
        self.megabatch_mult = megabatch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(length_grouped_indices(self.lengths, self.has_image, self.batch_size, g, self.megabatch_mult))


# --- the record check train-llava runs first ---------------------------------------------------------------

def validate_data(args: DataArgs) -> Report:
    """The shared record check (`conversations.validate`) of the training file, before any model loads.

    Text-only records are accepted (LLaVA's mix665k has them; the report counts them) and so are repeated ids
    (training keys nothing by id); an empty answer, a record starting with an assistant turn, an unsafe or
    missing image path are refused in one line naming the file and record. Raises ConversationFileError (a
    ValueError).
    """
    if args.data_path is None:
        raise RecordError("DataArgs.data_path is required")
    root = args.image_root if args.image_root is not None else str(Path(args.data_path).parent)
    if not Path(root).is_dir():
        raise RecordError(f"image root {root} is not a folder")
    return require_valid(args.data_path, root, allow_text_only=True, allow_duplicate_ids=True, command="train-llava")
