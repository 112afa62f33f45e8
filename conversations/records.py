"""The conversation record contract between stage 3 (the conversation builder) and stages 4-5 (LLaVA
training, inference, scoring): one module owns what a record is, and everyone else imports it.

A record is LLaVA's `{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}` with `image`
relative to the image root and `IMAGE_TOKEN` once, at the start of the first human turn. Training records
add `turn_types` (the question type of each turn); evaluation records add `question_type` and a `reference`
(`Reference`: the structured address and the expected answer, which the scorer reads).

Files are a JSON array (LLaVA's own form; written one record per line so that `head` and `grep` work) or
JSON lines; `iter_records` streams either (chosen by the first character), a JSON array incrementally, so a
file of a million records is read in bounded memory. `load_records` returns the records or raises ONE line
naming the file and the record. The JSON lines side is `clip_stage.core.fs`'s reader, the project's only one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Iterator

from clip_stage.core.fs import parse_jsonl

IMAGE_TOKEN = "<image>"
"""the image placeholder of the text; the tokenizer's special token of the same spelling"""

# Question types: the builder's names (`conversations.templates` registers one template set for each).
FULL_ADDRESS = "full_address"
STREET = "street"
CROSS_STREETS = "cross_streets"
PLACE = "place"
YES_NO = "yes_no"
MULTIPLE_CHOICE = "multiple_choice"
CAPTION = "caption"
SCENE = "scene"
QUESTION_TYPE_NAMES = (FULL_ADDRESS, STREET, CROSS_STREETS, PLACE, YES_NO, MULTIPLE_CHOICE, CAPTION, SCENE)
PHRASINGS = ("seen", "held_out")
"""an evaluation question's wording: one of training's (`seen`) or one training never used (`held_out`)"""

_WS = " \t\r\n"


class RecordError(ValueError):
    """A malformed record file, record or reference (the message names the file and the record)."""


# --- the reference of an evaluation record ------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Reference:
    """What a correct answer to an evaluation question is: written by the builder, read by infer and scoring.

    Field order is the order of the keys in the files. Text fields the question type does not use are ''.
    """

    image_id: str = ""
    question_type: str
    """one of QUESTION_TYPE_NAMES"""
    phrasing: str = ""
    """'seen' or 'held_out' (PHRASINGS); '' where unknown (answers imported from elsewhere)"""
    street: str = ""
    sub_street: str = ""
    cross_streets: tuple[str, ...] = ()
    neighbourhood: str = ""
    city: str = ""
    address: str = ""
    """the address rendered in the build's address style"""
    expected_answer: str = ""
    """'yes'/'no' (yes_no), the letter (multiple_choice), else the address text a correct answer names"""
    candidate: str = ""
    """yes_no: the street or sub-street the question names"""
    candidate_level: str = ""
    """yes_no: 'street' or 'sub_street'"""
    candidate_sub_street: str = ""
    """yes_no: the sub-street id of the candidate"""
    choices: tuple[str, ...] = ()
    """multiple_choice: the options, in letter order"""
    correct_choice: str = ""
    """multiple_choice: the right option's text"""
    lat: float | None = None
    lon: float | None = None
    utm_x: float | None = None
    utm_y: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "cross_streets", tuple(self.cross_streets))
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.question_type not in QUESTION_TYPE_NAMES:
            raise RecordError(f"unknown question type {self.question_type!r}; valid: {list(QUESTION_TYPE_NAMES)}")
        if self.phrasing not in ("", *PHRASINGS):
            raise RecordError(f"phrasing must be one of {list(PHRASINGS)}, got {self.phrasing!r}")
        if self.question_type == YES_NO and self.expected_answer not in ("yes", "no"):
            raise RecordError(f"a yes_no reference needs expected_answer 'yes' or 'no', got {self.expected_answer!r}")
        if self.question_type == MULTIPLE_CHOICE:
            if not re.fullmatch(r"[A-Z]", self.expected_answer):
                raise RecordError(f"a multiple_choice reference needs expected_answer a letter A-Z, "
                                  f"got {self.expected_answer!r}")
            if self.choices and ord(self.expected_answer) - ord("A") >= len(self.choices):
                raise RecordError(f"expected_answer {self.expected_answer!r} names no option of {len(self.choices)} choices")

    @property
    def yes(self) -> bool | None:
        """The expected verdict of a yes_no question (None for other types)."""
        return self.expected_answer == "yes" if self.question_type == YES_NO else None

    @property
    def letter(self) -> str | None:
        """The right option's letter of a multiple_choice question (None for other types)."""
        return self.expected_answer if self.question_type == MULTIPLE_CHOICE else None

    @property
    def utm(self) -> tuple[float, float] | None:
        """The photo's position (UTM metres), where the reference has it."""
        return None if self.utm_x is None or self.utm_y is None else (self.utm_x, self.utm_y)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cross_streets"], d["choices"] = list(self.cross_streets), list(self.choices)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "") -> "Reference":
        """The reference of a file; an unknown key, a missing question type or a value of the wrong kind is a
        RecordError prefixed with `where` (e.g. 'eval.json: record 3 (id x): ')."""
        if not isinstance(d, dict):
            raise RecordError(f"{where}reference must be an object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(REFERENCE_KEYS))
        if unknown:
            raise RecordError(f"{where}reference has unknown key(s) {unknown}; valid: {list(REFERENCE_KEYS)}")
        if not d.get("question_type"):
            raise RecordError(f"{where}reference has no question_type; valid: {list(QUESTION_TYPE_NAMES)}")
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d or d[f.name] is None:
                continue
            v = d[f.name]
            if f.name in ("cross_streets", "choices"):
                if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                    raise RecordError(f"{where}reference {f.name} must be a list of texts, got {v!r}")
            elif f.name in ("lat", "lon", "utm_x", "utm_y"):
                if v == "":
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise RecordError(f"{where}reference {f.name} must be a number, got {v!r}")
                v = float(v)
            elif not isinstance(v, str):
                raise RecordError(f"{where}reference {f.name} must be text, got {v!r}")
            kw[f.name] = v
        try:
            return cls(**kw)
        except RecordError as e:
            raise RecordError(f"{where}reference: {e}") from None


REFERENCE_KEYS = tuple(f.name for f in fields(Reference))


# --- records ------------------------------------------------------------------------------------------

def first_question(record: dict) -> str:
    """The first human turn of a LLaVA-format record without its IMAGE_TOKEN (or record['question'])."""
    if record.get("question"):
        return str(record["question"])
    for turn in record.get("conversations") or record.get("messages") or []:
        role = turn.get("from", turn.get("role"))
        if role in ("human", "user"):
            content = turn.get("value", turn.get("content", ""))
            if isinstance(content, list):
                content = " ".join(c.get("text", "") for c in content if isinstance(c, dict))
            return str(content).replace(IMAGE_TOKEN, "").strip()
    return ""


def record_where(path: Any, index: int, record: Any = None) -> str:
    """'FILE: record INDEX (id ID): ', the prefix of every error about one record."""
    rid = f" (id {record['id']!r})" if isinstance(record, dict) and "id" in record else ""
    return f"{path}: record {index}{rid}: "


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation question: what infer asks and scoring checks against."""

    id: str
    image: str | None
    question: str
    reference: Reference


def eval_records(records: Iterable[dict], path: Any = "records") -> list[EvalRecord]:
    """The evaluation records of a file, each with its Reference; ids must be present and unique."""
    out, seen = [], set()
    for i, r in enumerate(records):
        where = record_where(path, i, r)
        if not isinstance(r, dict) or "id" not in r:
            raise RecordError(f"{where}has no id")
        if "reference" not in r:
            raise RecordError(f"{where}has no 'reference': not an evaluation split")
        rid = str(r["id"])
        if rid in seen:
            raise RecordError(f"{where}duplicate id {rid!r}")
        seen.add(rid)
        image = str(r["image"]) if r.get("image") else None
        out.append(EvalRecord(rid, image, first_question(r), Reference.from_dict(r["reference"], where)))
    return out


# --- reading ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One top-level element of a record file, or a parse error at `index` (then `value` is None)."""

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
    for index, line in enumerate(parse_jsonl(f)):
        if line.error is None:
            yield Item(index, line.value)
        else:
            yield Item(index, error=f"{path}: line {line.lineno}: {line.error}; "
                                    "a JSON lines file holds one complete record per line")


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
    """All records of a file, each a JSON object; RecordError (one line) on the first malformed one (the
    `validate` command reports them all)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found")
    out = []
    for item in iter_records(path):
        if item.error:
            raise RecordError(item.error)
        if not isinstance(item.value, dict):
            raise RecordError(f"{path}: record {item.index}: must be a JSON object, got {type(item.value).__name__}")
        out.append(item.value)
    return out


def load_eval_records(path: str | os.PathLike) -> list[EvalRecord]:
    """The evaluation split written by the builder (or any records with a `reference`)."""
    return eval_records(load_records(path), path)


# --- writing ------------------------------------------------------------------------------------------

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
    """JSON lines, one record per line; returns the number of records."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n
