"""On-disk cache of `LlavaDataset`'s start-up pass (record ids, token lengths, has-image flags).

Tokenising LLaVA's 665k-record mix takes minutes, and every `accelerate launch` process would repeat it on
every run. The results are cached as `<cache_dir>/<key>.json`, the key a sha256 of everything they depend
on: a format version, the data file's identity, the tokenizer, the template, the encoder's code, the
image-token count and id, and max_length. A cache file that cannot be read or does not match the records is
logged and recomputed, never trusted; a failed write only costs the next run the full pass.

    cache = LengthCache(resolve_cache_dir(None), "convs.json")   # stat the file BEFORE reading its records
    key = cache.key(tokenizer, template=get_template("vicuna_v1"), num_image_tokens=576, max_length=2048,
                    image_token_id=None, encoder_files=[prompting.__file__, data.__file__])
    hit = cache.load(key, ids)                                   # (lengths, has_image) or None
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from clip_stage.core.fs import atomic_write_json, user_cache_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the cache file's layout or the meaning of its fields changes."""


def default_cache_dir() -> Path:
    return user_cache_dir("llava-lengths")


def resolve_cache_dir(setting: str | os.PathLike | None) -> Path | None:
    """`DataArgs.length_cache_dir` -> a folder, or None for "none" (no cache); None/""/"default": the default."""
    if setting is None or str(setting) in ("", "default"):
        return default_cache_dir()
    if str(setting).lower() == "none":
        return None
    return Path(setting).expanduser()


def tokenizer_fingerprint(tokenizer) -> str:
    """A cheap hash (tens of ms for a 32k vocab) of everything that decides how a HF tokenizer splits text."""
    h = hashlib.sha256()
    parts = [type(tokenizer).__name__, len(tokenizer), sorted(tokenizer.get_vocab().items()),
             tokenizer.special_tokens_map, tokenizer.bos_token_id, tokenizer.eos_token_id,
             # repr: an added token's lstrip/rstrip/normalized flags change tokenisation too
             sorted((i, repr(t)) for i, t in tokenizer.added_tokens_decoder.items())]
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    # The same vocab can split text differently (merges, normaliser, pre-tokeniser: e.g. Llama's `legacy`):
    # a fast tokenizer's full definition is its tokenizer.json, a sentencepiece one's its model proto.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    elif getattr(tokenizer, "sp_model", None) is not None:
        h.update(tokenizer.sp_model.serialized_model_proto())
    return h.hexdigest()


def code_fingerprint(files: Sequence[str | os.PathLike]) -> str:
    """sha256 of the given source files: a change to how records are encoded or checked changes lengths
    without changing any setting, so the key covers the code itself rather than trust a FORMAT_VERSION bump
    nobody remembers. The caller names its encoder's files (this module imports none of them)."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


class LengthCache:
    """The cache entries of one data file in `cache_dir`: `key` them by tokenisation settings, `load`, `save`.

    Construct it BEFORE reading the file: the file is identified by (resolved path, size, mtime_ns) taken
    now, so a file rewritten while it is being read gets a new key next time instead of the stale lengths.
    Not by a content hash: hashing a 1 GB file would add seconds of disk reads to every start of every rank,
    and any rewrite changes the mtime (only an edit that restores size and mtime, e.g. `cp -p`, is missed;
    the record ids are still checked).
    """

    def __init__(self, cache_dir: str | os.PathLike, data_file: str | os.PathLike):
        self.cache_dir = Path(cache_dir)
        self.data_file = Path(data_file).resolve()
        st = self.data_file.stat()
        self.identity = {"path": str(self.data_file), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def key(self, tokenizer, *, template: Any, num_image_tokens: int, max_length: int,
            image_token_id: int | None, encoder_files: Sequence[str | os.PathLike] = ()) -> str:
        """`template`: the template's definition (repr of the Template object, not only its name: it may be
        redefined); `encoder_files`: the source files that encode records (see `code_fingerprint`)."""
        parts = {"format": FORMAT_VERSION, "data": self.identity, "tokenizer": tokenizer_fingerprint(tokenizer),
                 "template": repr(template), "encoder": code_fingerprint(encoder_files),
                 "num_image_tokens": num_image_tokens, "max_length": max_length, "image_token_id": image_token_id}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.json"

    def load(self, key: str, ids: Sequence[Any]) -> tuple[list[int], list[bool]] | None:
        """(lengths, has_image) cached under `key` for exactly these record ids; None (recompute) otherwise."""
        path = self.path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            problem = _mismatch(entry, key, ids)
        except FileNotFoundError:
            return None
        except Exception as e:  # truncated, not JSON, another layout: recomputed, never trusted
            problem = f"unreadable ({type(e).__name__}: {e})"
        if problem:
            log.warning("length cache %s ignored (%s); tokenising %s again", path, problem, self.data_file)
            return None
        log.info("%s: lengths of %d records read from the cache %s", self.data_file, len(ids), path)
        return entry["lengths"], entry["has_image"]

    def save(self, key: str, ids: Sequence[Any], lengths: Sequence[int], has_image: Sequence[bool]) -> None:
        entry = {"format": FORMAT_VERSION, "key": key, "data": self.identity,
                 "ids": list(ids), "lengths": list(lengths), "has_image": list(has_image)}
        try:
            atomic_write_json(self.path(key), entry, indent=None)
        except (OSError, TypeError, ValueError) as e:  # read-only or full disk: training goes on, uncached
            log.warning("could not write the length cache %s: %s", self.path(key), e)


def _mismatch(entry: dict[str, Any], key: str, ids: Sequence[Any]) -> str | None:
    """Why a parsed cache entry cannot stand for these records (None: it can)."""
    if entry["key"] != key:
        return "written for other settings"
    if len(entry["ids"]) != len(ids):
        return f"{len(entry['ids'])} records cached, {len(ids)} in the data"
    if entry["ids"] != list(ids):
        return "other record ids"
    lengths, has_image = entry["lengths"], entry["has_image"]
    if not (len(lengths) == len(has_image) == len(ids) and all(type(n) is int and n > 0 for n in lengths)
            and all(type(b) is bool for b in has_image)):
        return "malformed lengths"
    return None
