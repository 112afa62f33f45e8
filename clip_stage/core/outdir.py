"""One rule for output folders, shared by every command that writes one.

A command calls `check_out_dir(out, kind, inputs=[...], overwrite=..., resume=...)` at the start of its
`main`, before anything loads, and writes `write_marker(folder, kind)` into what it produces
(inside its `atomic_dir` temporary folder, or into `--out` at the start of a run that writes in place). The rule:

* `--out` must not equal, contain or lie inside any input (dataset, image root, checkpoint, run folder; an
  input file such as a street network may sit beside `--out`, but not inside it): replacing `--out` would
  delete the input. Paths are compared after resolving symlinks.
* A missing or empty folder is fine.
* A non-empty folder is this command's own kind when it holds the marker `.address-llava.json` with its
  kind. A folder that holds all of the files a resuming command wrote before markers existed (e.g.
  a manifested `checkpoint-NNNNNN/` with `metrics.jsonl`) is continued, but never replaced: files are a
  guess. Anything else is refused, even with `--overwrite`: it is someone else's data.
* Its own kind is replaced only with `--overwrite`; commands that resume (train-clip, train-llava, demo,
  candidates) continue it instead (`resume=True`).

Refusals are `OutputFolderError` (a project ValueError: the command guard of clip_stage.core.errors prints it as one
line, `<command>: error: ...`, exit code 2), raised before anything is written or deleted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from clip_stage.core.fs import atomic_write_json

MARKER_FILE = ".address-llava.json"
MARKER_FORMAT = 1


class OutputFolderError(ValueError):
    """An --out folder this command must not write (someone else's data, an input, or its own without --overwrite)."""


def write_marker(folder: str | os.PathLike, kind: str, **info) -> Path:
    """Writes folder/.address-llava.json {"format", "kind", ...info}: the folder is `kind`'s output."""
    path = Path(folder) / MARKER_FILE
    atomic_write_json(path, {"format": MARKER_FORMAT, "kind": kind, **info})
    return path


def read_marker_kind(folder: str | os.PathLike) -> str | None:
    """The kind named by folder's marker, or None when there is none; an unreadable marker is an error."""
    path = Path(folder) / MARKER_FILE
    if not path.is_file():
        return None
    try:
        kind = json.loads(path.read_text(encoding="utf-8"))["kind"]
        if not isinstance(kind, str):
            raise TypeError("'kind' is not a string")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise OutputFolderError(f"{path}: unreadable output marker ({e}); refusing to write into {folder}") from None
    return kind


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(p))))


def on_disk(spec: str | None) -> str | None:
    """A model option as an input to protect: the path when it exists, else None (a hub id or open_clip tag)."""
    return spec if spec and os.path.exists(spec) else None


def looks_local(spec: str) -> bool:
    """A model option that is a path, not a hub id ("org/name"): absolute, ./ ../ ~, or nested deeper."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


class ModelPathError(ValueError):
    """A model option naming a local path that holds no model (a user error: one line, exit 2)."""


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def check_model_folder(spec: str, flag: str, needs: tuple[str, ...] = ("config.json",), what: str = "model") -> None:
    """A model option is a folder with config.json or a hub id ("org/name"), checked before any library loads
    it: a config-less folder would become a default-config model with every weight missing, and a local path
    that does not exist would be tried as a hub id (minutes of retries offline). A tokenizer option:
    `needs=TOKENIZER_FILES, what="tokenizer"` (any one of them)."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in needs):
            raise ModelPathError(f"{flag} {spec}: not a {what} folder (no {' or '.join(needs)})")
    elif os.path.exists(path):
        raise ModelPathError(f"{flag} {spec}: a file, not a {what} folder or hub id")
    elif looks_local(spec):
        raise ModelPathError(f"{flag} {spec}: no such folder (and not a hub id of the form org/name)")


def check_not_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], flag: str = "--out",
                    inside_ok: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuses `out` equal to, containing or inside an input (folders), or equal to / containing an input file.

    inside_ok: inputs that `out` may lie inside (only equal / containing is refused): a run folder that keeps
    its own exports beside its checkpoints.
    """
    out_r = _real(out)
    nested_ok = {_real(p) for p in inside_ok if p is not None and os.fspath(p) != ""}
    for inp in [*inputs, *inside_ok]:
        if inp is None or os.fspath(inp) == "":
            continue
        in_r = _real(inp)
        if out_r == in_r:
            raise OutputFolderError(f"{flag} {out} is the input {inp}; choose another path (writing it would "
                                    "destroy the input)")
        if out_r in in_r.parents:
            raise OutputFolderError(f"{flag} {out} contains the input {inp}; choose another path (writing it "
                                    "would delete the input)")
        if in_r in out_r.parents and in_r not in nested_ok:
            raise OutputFolderError(f"{flag} {out} lies inside the input {inp}; choose a path outside it")


def check_out_files(outs: dict[str, str | os.PathLike | None], inputs: Iterable[str | os.PathLike | None]) -> None:
    """Output *files* ({flag: path}, None = not asked for): none is an input, lies inside an input folder or is
    a folder, and no two are the same file (one would silently replace the other)."""
    inputs = list(inputs)
    seen: dict[Path, str] = {}
    for flag, out in outs.items():
        if out is None or os.fspath(out) == "":
            continue
        if Path(out).is_dir():
            raise OutputFolderError(f"{flag} {out} is a folder; give a file path")
        check_not_input(out, inputs, flag)
        real = _real(out)
        if real in seen:
            raise OutputFolderError(f"{flag} {out} is also {seen[real]}; give each output its own file")
        seen[real] = flag


def check_out_dir(out: str | os.PathLike, kind: str, *, inputs: Iterable[str | os.PathLike | None] = (),
                  overwrite: bool = False, resume: bool = False, legacy: Iterable[str] = (),
                  flag: str = "--out", inside_ok: Iterable[str | os.PathLike | None] = ()) -> str:
    """Applies the rule (module docstring) to `out` for command kind `kind`; raises OutputFolderError.

    legacy: names (glob patterns) of files that, ALL present, mark a folder this command wrote before markers
    existed (one common name such as dataset_info.json alone would adopt other tools' folders).
    inside_ok: inputs that `out` may lie inside (see check_not_input).
    Returns "new" (missing or empty folder), "replace" (own kind, --overwrite) or "resume" (own kind, resume).
    """
    check_not_input(out, inputs, flag, inside_ok)
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"{flag} {out} is a file, not a folder")
    if not path.exists() or not any(path.iterdir()):
        return "new"
    found = read_marker_kind(path)
    legacy = list(legacy)
    by_files = found is None and bool(legacy) and all(next(path.glob(pattern), None) is not None for pattern in legacy)
    if by_files:
        if not resume:  # files alone are a guess: enough to continue a folder, never to delete one
            raise OutputFolderError(
                f"{flag} {out} has no {MARKER_FILE}: it looks like a {kind} output from before markers, but it is not "
                "replaced on that guess; delete it yourself or choose another folder (nothing was deleted)")
        found = kind
    if found is None:
        raise OutputFolderError(f"{flag} {out} exists, is not empty and is not a {kind} output (no {MARKER_FILE}); "
                                "choose a new or empty folder (nothing was deleted)")
    if found != kind:
        raise OutputFolderError(f"{flag} {out} holds a {found} output, not a {kind} one; choose another folder")
    if resume:
        return "resume"
    if overwrite:
        return "replace"
    raise OutputFolderError(f"{flag} {out} exists and holds an earlier {kind} output; pass --overwrite to replace it")
