"""Validate any LLaVA-format conversation file (ours or anyone's), streamed in bounded memory.

    address-llava validate FILE [FILE ...] --image-root DATA/images [--max-problems 50]

Accepts a top-level JSON array (LLaVA's own files) or JSON lines. Checks, per record: it is an object;
`id`, `image` and `conversations` are present and non-empty; turns are objects with `from` and `value`,
roles alternate human/gpt starting with human and ending with gpt; every `value` is non-empty text;
`<image>` occurs exactly once, in the first human turn; the image path is relative, does not escape the
root (`..`, absolute paths, symlinks pointing out) and is an existing file; no two records of a file share
an `id` (predictions and scores are keyed by it; `--allow-duplicate-ids` accepts files that do). Every problem is printed as
`FILE: record INDEX (id=ID): FIELD: message`; a summary line per file follows; the exit status is 1 when
any problem was found, 2 on usage errors. `--no-image-check` skips the file-system checks (structure only).
"""

from __future__ import annotations

import argparse
import os
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from clip_stage.core.config import ArgumentParser
from clip_stage.core.errors import command_main
from clip_stage.core.fs import UnsafePathError, require_file, resolve_under_root

from conversations.records import IMAGE_TOKEN, iter_records

ROLES = ("human", "gpt")


@dataclass(frozen=True)
class Problem:
    path: str
    index: int
    id: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"record {self.index}" if self.index >= 0 else "file"
        return f"{self.path}: {where} (id={self.id}): {self.field}: {self.message}"


def _id_text(rec) -> str:
    if isinstance(rec, dict) and "id" in rec:
        return repr(rec["id"]) if isinstance(rec["id"], str) else str(rec["id"])
    return "?"


def check_record(rec, image_root: Path | None, allow_text_only: bool = False,
                 need_answer: bool = True) -> Iterator[tuple[str, str]]:
    """(field, message) for every problem of one record.

    need_answer=False accepts a conversation ending with a human turn (an evaluation record: its question)."""
    if not isinstance(rec, dict):
        yield "record", f"must be a JSON object, got {type(rec).__name__}"
        return
    rid = rec.get("id")
    if "id" not in rec:
        yield "id", "missing"
    elif isinstance(rid, bool) or not isinstance(rid, (str, int)):
        yield "id", f"must be a string or integer, got {type(rid).__name__}"
    elif isinstance(rid, str) and not rid.strip():
        yield "id", "empty"

    has_image = "image" in rec
    if not has_image:
        if not allow_text_only:
            yield "image", "missing (pass --allow-text-only for text-only records)"
    else:
        image = rec["image"]
        if not isinstance(image, str):
            yield "image", f"must be a string path, got {type(image).__name__}"
        elif not image.strip():
            yield "image", "empty"
        elif image_root is not None:
            try:
                full = resolve_under_root(image_root, image)
            except UnsafePathError as e:
                yield "image", str(e)
            else:
                if not full.is_file():
                    yield "image", f"{image!r} does not exist under the image root {image_root}"

    if "conversations" not in rec:
        yield "conversations", "missing"
        return
    conv = rec["conversations"]
    if not isinstance(conv, list):
        yield "conversations", f"must be a list, got {type(conv).__name__}"
        return
    if not conv:
        yield "conversations", "empty"
        return
    n_tokens, first_human_tokens, starts_with_gpt = 0, 0, False
    for t, turn in enumerate(conv):
        where = f"conversations[{t}]"
        if not isinstance(turn, dict):
            yield where, f"must be an object, got {type(turn).__name__}"
            continue
        role = turn.get("from")
        if "from" not in turn:
            yield f"{where}.from", "missing"
        elif role not in ROLES:
            yield f"{where}.from", f"must be 'human' or 'gpt', got {role!r}"
        elif t == 0 and role == "gpt":
            starts_with_gpt = True  # one problem, not one per turn of a conversation shifted by one
            yield f"{where}.from", ("the conversation starts with an assistant message (gpt): roles must alternate "
                                    "starting with human")
        elif role != ROLES[t % 2] and not starts_with_gpt:
            yield f"{where}.from", f"roles must alternate starting with human: expected {ROLES[t % 2]!r}, got {role!r}"
        if "value" not in turn:
            yield f"{where}.value", "missing"
            continue
        value = turn["value"]
        if not isinstance(value, str):
            yield f"{where}.value", f"must be a string, got {type(value).__name__}"
            continue
        if not value.replace(IMAGE_TOKEN, "").strip():
            yield f"{where}.value", "empty"
        count = value.count(IMAGE_TOKEN)
        n_tokens += count
        if t == 0:
            first_human_tokens = count
        elif count:
            yield f"{where}.value", f"{IMAGE_TOKEN} may appear only in the first human turn"
    if len(conv) % 2 and need_answer and not starts_with_gpt:
        yield "conversations", f"last turn (conversations[{len(conv) - 1}]) is not a gpt answer"
    if has_image:
        if first_human_tokens != 1:
            yield "conversations[0].value", f"must contain {IMAGE_TOKEN} exactly once (found {first_human_tokens})"
    elif n_tokens:
        yield "conversations", f"{IMAGE_TOKEN} in a record without an image"


@dataclass
class Report:
    path: str
    records: int = 0
    bad_records: int = 0
    problems: int = 0
    text_only: int = 0
    """records without an image (only allowed with allow_text_only)"""
    fatal: bool = False
    shown: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problems == 0

    def summary(self) -> str:
        state = "OK" if self.ok else "FAILED"
        tail = "; reading stopped at a malformed part of the file" if self.fatal else ""
        return (f"{self.path}: {state}: {self.records} records read, {self.problems} problems "
                f"in {self.bad_records} records{tail}")


def _id_key(rec) -> tuple[str, str | int] | None:
    rid = rec.get("id") if isinstance(rec, dict) else None
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        return None
    return (type(rid).__name__, rid)  # 7 and "7" are different ids


def _id_hash(rec) -> int:
    key = _id_key(rec)
    return 0 if key is None else hash(key) or 1  # 0 marks "no usable id"


def _duplicate_ids(path: str, id_hashes: array) -> Iterator[tuple[int, str, int]]:
    """(record index, id text, index of the first record with that id) for every repeated id.

    The first pass kept one 64-bit hash per record (sorted here, in place); records whose hash repeats are re-read in a second pass
    (only when there are any) and compared by their real ids, so a hash collision reports nothing.
    """
    import numpy as np

    if len(id_hashes) < 2:
        return
    hashes = np.frombuffer(id_hashes, dtype=np.int64)  # a view: sorted in place, no copy
    hashes.sort()
    same = (hashes[1:] == hashes[:-1]) & (hashes[1:] != 0)
    repeated = set(hashes[1:][same].tolist())
    if not repeated:
        return
    first: dict[tuple[str, str | int], int] = {}
    for item in iter_records(path):
        if item.error or _id_hash(item.value) not in repeated:
            continue
        key = _id_key(item.value)
        if key in first:
            yield item.index, _id_text(item.value), first[key]
        else:
            first[key] = item.index


def validate_file(path: str | os.PathLike, image_root: str | os.PathLike | None, allow_text_only: bool = False,
                  on_problem=None, keep: int = 0, allow_duplicate_ids: bool = False,
                  need_answer: bool = True) -> Report:
    """Streams `path`, calling `on_problem(Problem)` for each problem; keeps the first `keep` in the report."""
    path = str(path)
    root = Path(image_root) if image_root is not None else None
    report = Report(path)

    def emit(p: Problem) -> None:
        report.problems += 1
        if len(report.shown) < keep:
            report.shown.append(p)
        if on_problem:
            on_problem(p)

    if not Path(path).is_file():
        emit(Problem(path, -1, "?", "file", "not found"))
        return report
    id_hashes = array("q")  # 8 bytes a record: duplicates are found after the pass, in bounded memory
    bad_indices: set[int] = set()
    for item in iter_records(path):
        if item.error:
            emit(Problem(path, item.index, "?", "json", item.error.removeprefix(f"{path}: ")))
            report.bad_records += 1
            if item.fatal:
                report.fatal = True
                break
            report.records += 1
            continue
        report.records += 1
        report.text_only += isinstance(item.value, dict) and "image" not in item.value
        problems = list(check_record(item.value, root, allow_text_only, need_answer))
        id_hashes.append(_id_hash(item.value))
        for fld, msg in problems:
            emit(Problem(path, item.index, _id_text(item.value), fld, msg))
        if problems:
            report.bad_records += 1
            bad_indices.add(item.index)
    if not allow_duplicate_ids and not report.fatal:
        for index, rid, first in _duplicate_ids(path, id_hashes):
            emit(Problem(path, index, rid, "id", f"duplicate: record {first} has the same id"))
            if index not in bad_indices:
                report.bad_records += 1
                bad_indices.add(index)
    if report.records == 0 and not report.problems:
        emit(Problem(path, -1, "?", "file", "holds no records"))
    return report


class ConversationFileError(ValueError):
    """A conversation file that `require_valid` refused; the message is one line naming the file and record."""


def require_valid(path: str | os.PathLike, image_root: str | os.PathLike | None, *, allow_text_only: bool = False,
                  allow_duplicate_ids: bool = False, need_answer: bool = True, command: str = "") -> Report:
    """The one record check of every consumer (validate, train-llava, infer, benchmark), run before any model loads.

    Raises ConversationFileError with the first problem and the count of the others; returns the report when
    the file is clean. `command` (e.g. "train-llava") only words the hint of how to list every problem.
    """
    report = validate_file(path, image_root, allow_text_only, keep=1, allow_duplicate_ids=allow_duplicate_ids,
                           need_answer=need_answer)
    if report.ok:
        return report
    first = report.shown[0]
    more = report.problems - 1
    hint = (f" (and {more} more problem{'s' * (more > 1)} in {report.bad_records} record"
            f"{'s' * (report.bad_records > 1)}; `address-llava validate {path}"
            + (f" --image-root {image_root}" if image_root is not None else " --no-image-check")
            + "` lists them all)") if more else ""
    used_by = f" for {command}" if command else ""
    raise ConversationFileError(f"invalid conversation file{used_by}: {first}{hint}")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="address-llava validate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="LLaVA JSON (array) or JSON lines files")
    p.add_argument("--image-root", help="folder the `image` paths are relative to (required unless --no-image-check)")
    p.add_argument("--no-image-check", action="store_true", help="skip the image path and existence checks")
    p.add_argument("--allow-text-only", action="store_true",
                   help=f"accept records without `image` (then they must not contain {IMAGE_TOKEN}), as in LLaVA's mix665k")
    p.add_argument("--allow-duplicate-ids", action="store_true",
                   help="accept records that share an id (ids key predictions and scores, so ours never do)")
    p.add_argument("--max-problems", type=int, default=50,
                   help="print at most this many problems per file (all are counted; 0: print all)")
    return p


@command_main("validate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.image_root is None and not args.no_image_check:
        raise SystemExit("--image-root is required (or pass --no-image-check)")
    if args.image_root is not None and not Path(args.image_root).is_dir():
        raise SystemExit(f"image root {args.image_root} is not a folder")
    for path in args.files:  # a usage error (exit 2), unlike a file whose records are bad (exit 1)
        require_file(path)
    root = None if args.no_image_check else args.image_root
    failed = False
    for path in args.files:
        printed = 0

        def show(p: Problem) -> None:
            nonlocal printed
            if args.max_problems <= 0 or printed < args.max_problems:
                print(p)
            printed += 1

        report = validate_file(path, root, args.allow_text_only, on_problem=show,
                               allow_duplicate_ids=args.allow_duplicate_ids)
        if args.max_problems > 0 and printed > args.max_problems:
            print(f"{path}: ... {printed - args.max_problems} more problems not shown")
        print(report.summary() + ("" if root else " (images not checked)"))
        failed |= not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
