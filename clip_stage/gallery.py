"""Candidate-address galleries for evaluation ("flexible queries") and their cached text embeddings.

A gallery is a list of candidate texts; each candidate maps to the set of sub-streets it names, and from
them to the set of main streets and neighbourhoods. That mapping is how every metric is scored, whatever
the style of the texts:

- from the dataset (`gallery_from_dataset(dir, style)`): every sub-street of the city (sub_streets.geojson,
  plus any sub-street only seen in records.parquet) rendered in an address style of
  `schema.ADDRESS_STYLES`; sub-streets rendering to the same text share one candidate. In the `full`
  style each candidate names one sub-street; in the `street` style a candidate names all the sub-streets
  of its street; in the `neighbourhood` style all those of a neighbourhood.
- from a user file (`gallery_from_file(path, dir)`): one address per line, or JSONL objects with
  `address` and optionally `sub_street` / `sub_streets` / `street` / `neighbourhood`. Explicit fields
  win; a bare text is matched (case- and whitespace-insensitively) against every style's rendering of
  every sub-street of the city and maps to all sub-streets whose rendering it equals. A candidate that
  matches nothing maps to no sub-street: it can be predicted but never counts as right.

Text embeddings (L2-normalised, float32) are computed once per (model weights, gallery texts), in
batches, and cached in memory and on disk under `<cache_dir>/<model-hash>-<texts-hash>.pt`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from clip_stage.core.fs import parse_jsonl, user_cache_dir
from clip_stage.core.schema import ADDRESS_STYLES, Address, read_records, read_sub_streets, render_address
from clip_stage.text_encoder import encode_text, padding_trim

log = logging.getLogger(__name__)


class CandidateFileError(ValueError):
    """A --candidates file that cannot be read as candidate addresses (one line naming the file and line)."""


@dataclass(frozen=True)
class Candidate:
    text: str
    sub_streets: frozenset[str]
    streets: frozenset[str]
    neighbourhoods: frozenset[str]


@dataclass
class Gallery:
    candidates: list[Candidate]
    source: str
    """'style:<name>' or 'file:<path>'."""
    meta: dict = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.candidates]

    def __len__(self) -> int:
        return len(self.candidates)

    def describe(self) -> dict:
        n = len(self.candidates)
        return {
            "source": self.source,
            "num_candidates": n,
            "single_sub_street": sum(len(c.sub_streets) == 1 for c in self.candidates),
            "single_street": sum(len(c.streets) == 1 for c in self.candidates),
            "unmatched": sum(not c.sub_streets for c in self.candidates),
            **self.meta,
        }


def city_addresses(dataset_dir: str | Path) -> dict[str, Address]:
    """sub_street id -> Address for every sub-street of the city (geojson features, then records)."""
    out: dict[str, Address] = {}
    for feat in read_sub_streets(dataset_dir):
        a = Address.from_row(feat)
        out.setdefault(a.sub_street, a)
    df = read_records(dataset_dir)
    for _, row in df.drop_duplicates("sub_street").iterrows():
        out.setdefault(str(row["sub_street"]), Address.from_row(row))
    return out


def _candidate(text: str, subs, addresses: dict[str, Address]) -> Candidate:
    subs = frozenset(s for s in subs if s in addresses)
    return Candidate(text, subs, frozenset(addresses[s].street for s in subs),
                     frozenset(addresses[s].neighbourhood for s in subs))


def gallery_from_dataset(dataset_dir: str | Path, style: str = "full") -> Gallery:
    """Every distinct address of the city in one style (see the module docstring for the mapping)."""
    ADDRESS_STYLES.lookup(style)  # fail before reading the dataset
    addresses = city_addresses(dataset_dir)
    groups: dict[str, list[str]] = {}
    for sub, a in sorted(addresses.items()):
        groups.setdefault(render_address(a, style), []).append(sub)
    cands = [_candidate(text, subs, addresses) for text, subs in groups.items()]
    return Gallery(cands, f"style:{style}", {"style": style})


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _json_candidate(line: str, where: str, addresses: dict[str, Address], by_text: dict[str, set[str]],
                    by_street: dict[str, set[str]], by_hood: dict[str, set[str]]) -> tuple[str, set[str]]:
    """(text, sub-streets) of one JSONL candidate line; CandidateFileError names `where` (file:line)."""
    (parsed,) = parse_jsonl([line])
    if parsed.error is not None:
        raise CandidateFileError(f"{where}: malformed JSON ({parsed.error})")
    obj = parsed.value
    if not isinstance(obj, dict):
        raise CandidateFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text = obj.get("address")
    if not isinstance(text, str) or not text.strip():
        raise CandidateFileError(f"{where}: JSON candidate without an 'address' text")
    text = text.strip()
    if obj.get("sub_streets") or obj.get("sub_street"):
        subs = obj.get("sub_streets") or [obj["sub_street"]]
        subs = [subs] if isinstance(subs, str) else subs
        if not isinstance(subs, list) or not all(isinstance(x, str) for x in subs):
            raise CandidateFileError(f"{where}: 'sub_streets' must be a list of sub-street ids")
        unknown = set(subs) - set(addresses)
        if unknown:
            raise CandidateFileError(f"{where}: sub-streets {sorted(unknown)} are not in the dataset")
        return text, set(subs)
    if obj.get("street"):
        subs = by_street.get(str(obj["street"]), set())
        if obj.get("neighbourhood"):
            subs = subs & by_hood.get(str(obj["neighbourhood"]), set())
        return text, subs
    if obj.get("neighbourhood"):
        return text, by_hood.get(str(obj["neighbourhood"]), set())
    return text, by_text.get(_norm(text), set())


def gallery_from_file(path: str | Path, dataset_dir: str | Path) -> Gallery:
    """A user's candidate file (plain lines or JSONL) mapped onto the city's sub-streets."""
    path = Path(path)
    addresses = city_addresses(dataset_dir)
    by_text: dict[str, set[str]] = {}
    for sub, a in addresses.items():
        for style in ADDRESS_STYLES:
            by_text.setdefault(_norm(render_address(a, style)), set()).add(sub)
    by_street: dict[str, set[str]] = {}
    by_hood: dict[str, set[str]] = {}
    for sub, a in addresses.items():
        by_street.setdefault(a.street, set()).add(sub)
        by_hood.setdefault(a.neighbourhood, set()).add(sub)

    cands, seen = [], set()
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise CandidateFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); give one address per line "
                                 "or JSON lines") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            text, subs = _json_candidate(line, f"{path}:{lineno}", addresses, by_text, by_street, by_hood)
        else:
            text = line.strip()
            subs = by_text.get(_norm(text), set())
        if text in seen:
            continue  # duplicate texts would only tie with themselves
        seen.add(text)
        cands.append(_candidate(text, subs, addresses))
    if not cands:
        raise CandidateFileError(f"{path}: no candidate addresses (the file is empty or blank)")
    g = Gallery(cands, f"file:{path}", {"file": str(path)})
    if g.describe()["unmatched"]:
        log.warning("%s: %d of %d candidates match no sub-street of the dataset (they can never count as right)",
                    path, g.describe()["unmatched"], len(cands))
    return g


# --------------------------------------------------------------------------------------------------
# embeddings


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the parameter/buffer names, shapes, dtypes and bytes (changes whenever the weights do)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def texts_fingerprint(texts: list[str], context: str = "") -> str:
    h = hashlib.sha256(context.encode())
    for t in texts:
        h.update(b"\x00" + t.encode("utf-8"))
    return h.hexdigest()


def default_cache_dir() -> Path:
    return user_cache_dir("gallery")


@torch.no_grad()
def encode_in_batches(model: torch.nn.Module, items: Sequence, batch_size: int,
                      encode: Callable[[Sequence], torch.Tensor]) -> torch.Tensor:
    """`encode(chunk)` for each chunk of `items`, the model in eval mode (restored after), as one float32 CPU tensor."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(items), batch_size):
            out.append(encode(items[i:i + batch_size]).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def encode_texts(model: torch.nn.Module, tokenizer, texts: list[str], batch_size: int = 256,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """L2-normalised text embeddings [N, D] (float32, on CPU), computed in batches.

    Each batch is cut after its last EOT where that is exact (`clip_stage.text_encoder`): addresses are far
    shorter than the context, so this is several times faster than open_clip's padded `encode_text`.
    """
    trim = padding_trim(model) or (lambda tokens: tokens)
    return encode_in_batches(model, texts, batch_size,
                             lambda chunk: encode_text(model, trim(tokenizer(list(chunk))).to(device)))


class GalleryEncoder:
    """Text-gallery embeddings computed once per (model weights, texts): memory first, then disk.

    `model_key` (e.g. a checkpoint path hash) can be passed to skip hashing the weights; by default the
    weights are hashed, so a model that keeps training never reuses stale embeddings.
    """

    def __init__(self, cache_dir: str | Path | None = None, batch_size: int = 256, device: str | torch.device = "cpu"):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self.device = device
        self._memory: dict[tuple[str, str], torch.Tensor] = {}
        self.stats = {"memory_hits": 0, "disk_hits": 0, "encoded": 0}

    def key(self, model, tokenizer, texts: list[str], model_key: str | None = None) -> tuple[str, str]:
        ctx = str(getattr(tokenizer, "context_length", "")) + type(tokenizer).__name__
        return (model_key or model_fingerprint(model), texts_fingerprint(texts, ctx))

    def __call__(self, model, tokenizer, texts: list[str], model_key: str | None = None) -> torch.Tensor:
        key = self.key(model, tokenizer, texts, model_key)
        if key in self._memory:
            self.stats["memory_hits"] += 1
            return self._memory[key]
        path = self.cache_dir / f"{key[0][:24]}-{key[1][:24]}.pt" if self.cache_dir is not None else None
        if path is not None and path.exists():
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                if blob["model"] == key[0] and blob["texts"] == key[1] and blob["embeddings"].shape[0] == len(texts):
                    self.stats["disk_hits"] += 1
                    self._memory[key] = blob["embeddings"]
                    return blob["embeddings"]
            except Exception as e:  # a corrupt cache file is recomputed, never trusted
                log.warning("ignoring unreadable gallery cache %s (%s)", path, e)
        emb = encode_texts(model, tokenizer, texts, self.batch_size, self.device)
        self.stats["encoded"] += 1
        self._memory[key] = emb
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save({"model": key[0], "texts": key[1], "embeddings": emb}, tmp)
            os.replace(tmp, path)
        return emb


__all__ = ["Candidate", "CandidateFileError", "Gallery", "GalleryEncoder", "city_addresses", "gallery_from_dataset", "gallery_from_file",
           "encode_in_batches", "encode_texts", "model_fingerprint", "texts_fingerprint", "default_cache_dir"]
