"""Conversation file formats: streaming readers and the writers/converters of every output form.

- LLaVA JSON: a JSON array of `{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}`
  with `image` relative to the image root and `<image>` once, in the first human turn. Written one record
  per line so that `head` and `grep` work on it. JSONL (one record per line) is accepted everywhere too.
- messages (LLaMA-Factory "sharegpt" with `messages`/`images`): `{"messages": [{"role": "user"|"assistant",
  "content": str}], "images": [path]}` with the `<image>` placeholder kept in the text.
- messages-trl: the same with typed content parts (`[{"type": "image"}, {"type": "text", "text": ...}]`)
  and no `<image>` in the text, as TRL's vision SFT and chat templates read them.
- HF `datasets`: a DatasetDict (train / eval) saved with `save_to_disk`, or one parquet file per split.
  Both splits have ONE schema (`hf_schema`), so `load_dataset("parquet", data_files={"train": ..., "eval":
  ...})` loads them together: every column is in both splits, null where it does not apply (`turn_types` and
  `candidates` are training fields, `question_type` and `reference` evaluation ones). `reference` stays a
  struct, not a JSON string: each of its keys holds one type (text, text lists, floats), so Arrow types it
  once, `ds["eval"][0]["reference"]["street"]` reads it directly and parquet readers (pandas, DuckDB) can
  filter on `reference.question_type`; training rows hold null there.
- LLaMA-Factory: `dataset_info.json` beside the `messages` files (`llamafactory_dataset_info`) registers them
  as `address_train` / `address_eval` in its "sharegpt" format; images are relative to the image root, which
  LLaMA-Factory takes as `--media_dir`.

`iter_records` reads a top-level JSON array incrementally (a small reader over `json.JSONDecoder.raw_decode`
on chunks), so a file of a million records is read in bounded memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

IMAGE_TOKEN = "<image>"
ROLE_MAP = {"human": "user", "gpt": "assistant"}
_WS = " \t\r\n"


@dataclass(frozen=True)
class Item:
    """One top-level element of a conversation file, or a parse error at `index` (then `value` is None)."""

    index: int
    value: Any = None
    error: str | None = None
    fatal: bool = False
    """the reader cannot continue after this error (malformed JSON array)"""


def _array_items(f, path: str, chunk_size: int, max_record_chars: int) -> Iterator[Item]:
    dec = json.JSONDecoder()
    buf, pos, eof = "", 0, False
    consumed, consumed_lines = 0, 0  # characters / newlines dropped from the front of buf

    def fill() -> None:
        nonlocal buf, pos, eof, consumed, consumed_lines
        # read at least as much as is pending so a long record costs O(n log n), not O(n^2)
        chunk = f.read(max(chunk_size, len(buf) - pos))
        consumed += pos
        consumed_lines += buf.count("\n", 0, pos)
        buf, pos = buf[pos:] + chunk, 0
        eof = not chunk

    def where(at: int) -> str:
        return f"line {consumed_lines + buf.count(chr(10), 0, at) + 1}, char {consumed + at}"

    def next_char() -> str | None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in _WS:
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if eof:
                return None
            fill()

    index = 0
    c = next_char()
    if c != "[":
        yield Item(0, error=f"{path}: top level must be a JSON array ('[') or JSON lines, found "
                            f"{'end of file' if c is None else repr(c)} at {where(pos)}", fatal=True)
        return
    pos += 1
    if next_char() == "]":
        pos += 1
    else:
        while True:
            if next_char() is None:
                yield Item(index, error=f"{path}: unexpected end of file inside the array at {where(pos)}", fatal=True)
                return
            while True:
                try:
                    value, end = dec.raw_decode(buf, pos)
                    if end < len(buf) or eof:
                        break
                except json.JSONDecodeError as e:
                    if eof or len(buf) - pos > max_record_chars:
                        too_big = not eof
                        truncated = eof and (e.pos >= len(buf.rstrip(_WS)) or e.msg.startswith("Unterminated"))
                        msg = (f"record longer than {max_record_chars} characters or malformed" if too_big
                               else f"unexpected end of file inside record {index} ({e.msg})" if truncated
                               else f"invalid JSON ({e.msg})")
                        yield Item(index, error=f"{path}: {msg} at {where(e.pos)}", fatal=True)
                        return
                fill()  # the value may continue in the next chunk
            pos = end
            yield Item(index, value)
            index += 1
            c = next_char()
            if c == ",":
                pos += 1
                continue
            if c == "]":
                pos += 1
                break
            yield Item(index, error=f"{path}: expected ',' or ']' after record {index - 1}, found "
                                    f"{'end of file' if c is None else repr(c)} at {where(pos)}", fatal=True)
            return
    if next_char() is not None:
        yield Item(index, error=f"{path}: extra data after the closing ']' at {where(pos)}", fatal=True)


def _jsonl_items(f, path: str) -> Iterator[Item]:
    index = 0
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            yield Item(index, json.loads(line))
        except json.JSONDecodeError as e:
            yield Item(index, error=f"{path}: line {lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                                    "a JSON lines file holds one complete record per line")
        index += 1


def iter_records(path: str | os.PathLike, chunk_size: int = 1 << 16, max_record_chars: int = 64 << 20) -> Iterator[Item]:
    """Items of a LLaVA JSON array or a JSON lines file (chosen by the first character), streamed."""
    path = str(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            head = f.read(4096).lstrip(_WS)
            f.seek(0)
            if path.endswith(".jsonl") or head.startswith("{"):
                yield from _jsonl_items(f, path)
            else:
                yield from _array_items(f, path, chunk_size, max_record_chars)
    except UnicodeDecodeError as e:
        yield Item(-1, error=f"{path}: not UTF-8 text ({e.reason} at byte {e.start})", fatal=True)


def load_records(path: str | os.PathLike) -> list[dict]:
    """All records of a file; raises ValueError on the first malformed one (use `validate` for a full report)."""
    out = []
    for item in iter_records(path):
        if item.error:
            raise ValueError(item.error)
        out.append(item.value)
    return out


def write_json_array(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """A JSON array with one record per line (streamed); returns the number of records."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for rec in records:
            f.write(("\n" if n == 0 else ",\n") + json.dumps(rec, ensure_ascii=False))
            n += 1
        f.write("\n]\n")
    return n


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def to_messages(record: dict, style: str = "llamafactory") -> dict:
    """A LLaVA record in the `messages` form: style 'llamafactory' (string content, `<image>` kept) or
    'trl' (typed content parts, an image part where `<image>` was)."""
    if style not in ("llamafactory", "trl"):
        raise ValueError(f"unknown messages style {style!r}; valid: ['llamafactory', 'trl']")
    messages = []
    for turn in record["conversations"]:
        role, text = ROLE_MAP[turn["from"]], turn["value"]
        if style == "llamafactory":
            messages.append({"role": role, "content": text})
            continue
        parts: list[dict] = []
        if IMAGE_TOKEN in text:
            before, _, after = text.partition(IMAGE_TOKEN)
            if before.strip():
                parts.append({"type": "text", "text": before.strip()})
            parts.append({"type": "image"})
            text = after
        if text.strip():
            parts.append({"type": "text", "text": text.strip()})
        messages.append({"role": role, "content": parts})
    out = {"id": record["id"], "messages": messages, "images": [record["image"]] if record.get("image") else []}
    for key in ("turn_types", "question_type", "reference"):
        if key in record:
            out[key] = record[key]
    return out


# Columns every HF split carries whatever its records hold, with their types (the rest are inferred).
HF_FIXED_COLUMNS = {"turn_types": "list<string>", "candidates": "list<string>", "question_type": "string"}

LLAMAFACTORY_PREFIX = "address"


def hf_rows(records: Iterable[dict]) -> Iterator[dict]:
    """Rows of the HF export: the LLaVA fields, the LLaMA-Factory messages and the image list."""
    for rec in records:
        row = dict(rec)
        m = to_messages(rec, "llamafactory")
        row["messages"], row["images"] = m["messages"], m["images"]
        yield row


def hf_schema(splits: dict[str, list[dict]]):
    """One Arrow schema for the rows of every split: the union of their columns, each with one type.

    Each split's schema is inferred by pyarrow and they are unified with its permissive promotion (a column
    null in one split takes the other's type; struct fields are merged), plus `HF_FIXED_COLUMNS`. A column
    whose types cannot be unified (text in one split, numbers in another) is an error naming it.
    """
    import pyarrow as pa

    fixed = pa.schema([(name, pa.list_(pa.string()) if kind == "list<string>" else pa.string())
                       for name, kind in HF_FIXED_COLUMNS.items()])
    schemas = [fixed]
    for name, rows in splits.items():
        try:
            schemas.append(pa.Table.from_pylist(rows).schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(f"HF export, split {name}: a column holds values of different types ({e})") from e
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"HF export: the splits {sorted(splits)} give one column different types ({e})") from e


def export_hf(out_dir: str | os.PathLike, splits: dict[str, list[dict]], kind: str = "disk") -> Path:
    """Writes a `datasets.DatasetDict` (kind 'disk': save_to_disk) or `<split>.parquet` files ('parquet'),
    every split with the same columns and types (`hf_schema`)."""
    import datasets

    if kind not in ("disk", "parquet"):
        raise ValueError(f"unknown HF export kind {kind!r}; valid: ['disk', 'parquet']")
    out_dir = Path(out_dir)
    rows = {name: list(hf_rows(recs)) for name, recs in splits.items() if recs}
    schema = hf_schema(rows)
    features = datasets.Features.from_arrow_schema(schema)
    # every row gets every column (Dataset.from_list takes its columns from the first row alone)
    dd = datasets.DatasetDict({name: datasets.Dataset.from_list([{c: r.get(c) for c in schema.names} for r in rs],
                                                                features=features)
                               for name, rs in rows.items()})
    if kind == "disk":
        dd.save_to_disk(str(out_dir))
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, ds in dd.items():
            ds.to_parquet(str(out_dir / f"{name}.parquet"))
    return out_dir


def llamafactory_dataset_info(files: dict[str, str], prefix: str = LLAMAFACTORY_PREFIX) -> dict[str, dict]:
    """LLaMA-Factory `dataset_info.json` entries (split -> `messages` file name) in its "sharegpt" format.

    Its `file_name` is relative to the folder holding dataset_info.json (LLaMA-Factory's `--dataset_dir`); the
    images are relative to the address dataset's image root (its `--media_dir`).
    """
    return {f"{prefix}_{split}": {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": ROLE_MAP["human"],
                 "assistant_tag": ROLE_MAP["gpt"]},
    } for split, file_name in files.items()}
