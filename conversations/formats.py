"""Conversation output forms beside LLaVA's own: converters from the records of `conversations.records`.

- LLaVA JSON / JSONL: the records themselves (`conversations.records` reads and writes them).
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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

from conversations.records import IMAGE_TOKEN

ROLE_MAP = {"human": "user", "gpt": "assistant"}


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
