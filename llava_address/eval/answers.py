"""The answers file `infer` and every generating `benchmark` system write, and the record of what wrote it.

An answers file is JSON lines, one per record: `{"id", "question", "answer", "reference", "image"}`, or an error
row with "error" instead of "answer" (`llava_address.eval.scoring` reads them). It is resumable: `read_done_ids`
gives the ids already there (cutting a torn last line a killed run left), `append_lines` adds a batch in one
fsynced write. Only answers provably written by the same model and settings are resumed: `NAME.system.json`
beside `NAME.jsonl` records what wrote them (`answers_source`: the model and the paths it names as real paths
with a fingerprint of their files, and the options that change an answer), checked before the model loads
(`check_answers_record`); answers from another model, or with no record, are refused in one line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from clip_stage.core.fs import atomic_write_json, atomic_write_text, contents_fingerprint, parse_jsonl
from llava_address.eval.errors import InferenceInputError

log = logging.getLogger(__name__)


ANSWERS_LINE_START = b'{"id": '  # json.dumps of every answers row: the id comes first


def read_done_ids(path: str | os.PathLike, retry_errors: bool = False, repair: bool = True) -> set[str]:
    """Ids already answered in `path` (error rows too, unless `retry_errors`); a torn last line is cut off.

    With `retry_errors` the error rows are removed from the file (rewritten atomically) so that their retried
    answers do not stand beside them. With `repair=False` the file is only read (a check before the model
    loads, when the answers may still be refused as another model's: nothing of theirs is cut or removed).
    """
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    good_end = data.rfind(b"\n") + 1
    done: set[str] = set()
    kept: list[bytes] = []
    n_errors = 0
    lines = data[:good_end].splitlines()
    parsed = list(parse_jsonl(lines))
    for jl in parsed:  # all checked before anything is cut or rewritten: someone else's file stays as it is
        row = jl.value
        if jl.error is not None or not isinstance(row, dict) or "id" not in row or not ({"answer", "error"} & set(row)):
            raise InferenceInputError(f"{path}: line {jl.lineno}: not an answers line (id + answer or error); "
                                      "refusing to append to it")
    # One unterminated line and nothing else: ours when it opens as every answers line does (a first batch torn
    # by a kill), else someone else's file.
    if good_end < len(data) and not parsed and not data.startswith(ANSWERS_LINE_START):
        raise InferenceInputError(f"{path}: not an answers file (no complete answers line); refusing to write it")
    for jl in parsed:
        row = jl.value
        if retry_errors and "error" in row:
            n_errors += 1
            continue
        done.add(str(row["id"]))
        kept.append(lines[jl.lineno - 1])
    if not repair:
        return done
    if good_end < len(data):
        log.warning("%s: dropping a torn last line (%d bytes) from an interrupted run", path, len(data) - good_end)
        with path.open("r+b") as f:
            f.truncate(good_end)
    if n_errors:
        log.warning("%s: retrying %d error rows", path, n_errors)
        atomic_write_text(path, "".join(x.decode("utf-8") + "\n" for x in kept))
    return done


def append_lines(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Appends rows as JSONL in one write, fsynced: a batch is in the file whole or (at worst) torn last."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    if not payload:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(payload)
        while view:  # os.write may write less than asked (a signal, a nearly full disk): the rest follows
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


# --- what wrote an answers file --------------------------------------------------------------------------

ANSWERS_SOURCE_FORMAT = 2
"""2: the record fingerprints the contents of the local paths it names (1, benchmark only: kind, target and
options)"""


class AnswersSourceError(InferenceInputError):
    """Answers that cannot be resumed: written by another model or settings, or with no record of what wrote them."""


def answers_record_path(answers_path: str | os.PathLike) -> Path:
    """The record of what wrote an answers file: `NAME.jsonl` -> `NAME.system.json` beside it."""
    return Path(answers_path).with_suffix(".system.json")


def answers_source(kind: str, target: str | None, options: dict[str, Any], paths: Sequence[str] = ()) -> dict:
    """What writes a file of answers, as recorded beside it: `kind` (the writer: a benchmark system kind or
    "infer"), `target` (the model) and `options` (what else changes an answer; JSON values). `paths` are the
    keys ("target" or option names) that may name local files or folders: those that exist are recorded as
    real paths with the `contents_fingerprint` of their files (a hub id is recorded as its id)."""
    named = {key: target if key == "target" else options.get(key) for key in paths}
    local = {key: os.path.realpath(p) for key, p in named.items() if p and os.path.exists(p)}
    return {"format": ANSWERS_SOURCE_FORMAT, "kind": kind, "target": local.get("target", target),
            "options": {k: local.get(k, v) for k, v in options.items()},
            "contents": {key: contents_fingerprint(p) for key, p in sorted(local.items())}}


def describe_answers_source(source: dict) -> str:
    """'llava:/runs/merged,adapter=... (files of 2026-12-01 15:44:03 UTC, 9c1e...)' for messages."""
    opts = ",".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                    for k, v in (source.get("options") or {}).items())
    target = source.get("target")
    text = f"{source.get('kind')}" + ("" if target is None else f":{target}") + (f",{opts}" if opts else "")
    contents = source.get("contents")
    if not isinstance(contents, dict):
        return text + " (contents not recorded: written before the benchmark fingerprinted models)"
    stamps = [f"{'' if key == 'target' else key + ' '}files of {c.get('newest')}, {c.get('sha256')}"
              for key, c in contents.items() if isinstance(c, dict)]
    return text + (f" ({'; '.join(stamps)})" if stamps else "")


def check_answers_record(answers_path: str | os.PathLike, source: dict, *, todo: str = "use another --out",
                         label: str = "", error: type[Exception] = AnswersSourceError) -> dict:
    """Refuses to resume answers that were not provably written by `source` (`answers_source`): another model,
    options, or the same folder holding another model now (re-merged, replaced), or answers with no record of
    what wrote them (from before records were kept, or copied in): resumed, they would pass for `source`'s.
    Call it before the model loads, and `record_answers` once it has loaded. Raises `error` (one line:
    `label`, what wrote the answers, what is given now, then `todo`); returns `source`, to record.
    `infer` and every generating system of `benchmark` go through it."""
    answers_path = Path(answers_path)
    if not answers_path.is_file() or answers_path.stat().st_size == 0:
        return source  # nothing to resume
    record = answers_record_path(answers_path)
    todo = f"{todo} to answer afresh (nothing was deleted)"
    if not record.is_file():
        raise error(f"{label}{answers_path} has no record of the model that wrote it ({record.name} missing: written "
                    f"before models were recorded, or copied in), so its answers cannot be told from those of "
                    f"{describe_answers_source(source)}; {todo}")
    try:
        was = json.loads(record.read_text(encoding="utf-8"))
        if not isinstance(was, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise error(f"{label}{record}: unreadable ({e}); {todo}") from None
    if was.get("format") is None and not source.get("contents") \
            and was == {k: source.get(k) for k in ("kind", "target", "options")}:
        return source  # a format-1 record of a hub id: nothing local to fingerprint, then or now
    if was != source:
        raise error(f"{label}{answers_path} was written by {describe_answers_source(was)}; "
                    f"given now: {describe_answers_source(source)}; {todo}")
    return source


def record_answers(answers_path: str | os.PathLike, source: dict) -> None:
    """Writes `NAME.system.json` beside the answers: what is about to write them (checked by
    `check_answers_record` first, so it is either what wrote them or there are none yet)."""
    atomic_write_json(answers_record_path(answers_path), source)
