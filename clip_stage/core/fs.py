"""Filesystem helpers shared by every stage: atomic writes, verified folders, and image paths that cannot
escape their root.

Atomic writes go to a temporary sibling and are `os.replace`d into place, so a killed process leaves
either the old file/folder or the new one, never half of one. A verified folder (`atomic_dir(...,
verified=True)`, used for checkpoints) also gets a `manifest.json` (size + sha256 of every file), and its
files and the folder itself are fsynced before the rename, so a power cut cannot leave a renamed folder
with empty files; `verify_manifest` checks it on load. `remove_stale_temps` deletes what killed saves left.
`contents_fingerprint` is the cheap identity of a model folder (top-level files' names, sizes and times).

`iter_jsonl` / `read_jsonl` are the project's one JSON lines reader (each stage's JSONL files and the
conversation records of `conversations.records` go through it): blank lines are skipped and a malformed
line is reported with its file and line number.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


def shared_mode(is_dir: bool) -> int:
    """The mode a plain open()/mkdir() would give under the process umask. mkstemp/mkdtemp create owner-only
    files (0600/0700), which would make every output unreadable to the user's group (a shared model folder)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if is_dir else 0o666) & ~mask


def share_owner_only_files(folder: str | os.PathLike) -> None:
    """Gives the files of a folder this process just wrote that came out owner-only (safetensors' `save_file`
    creates 0600 files, as mkstemp does) the mode of the umask. A hard-linked file (a dataset's image, which is
    also the user's input) is never touched: its mode is the input's."""
    mode = shared_mode(is_dir=False)
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and not st.st_mode & 0o077 and (st.st_mode & 0o777) != mode:
                os.chmod(p, mode)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, shared_mode(is_dir=False))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def require_file(path: str | os.PathLike) -> Path:
    """`path` as a Path when it is a file; FileNotFoundError / IsADirectoryError (one line naming it) if not."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` writes a temporary file beside `path` (`.<name>.XXXX.tmp<suffix>`: the same last suffix, so
    writers that infer the format from it, savefig or parquet, work, and one `remove_stale_temps` knows); it
    then replaces `path`, or is removed if `write` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    try:
        os.fchmod(fd, shared_mode(is_dir=False))
        os.close(fd)
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True, verified: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside `path` (`.<name>.XXXX.tmp`); on success it replaces `path`, on error
    it is removed.

    An existing `path` is kept until the new folder is complete (then removed), so an interrupted
    build never leaves a half-written dataset or checkpoint; what a killed earlier write of `path` left
    beside it (`remove_stale_temps`) is removed first. verified: write `manifest.json` into the
    temporary folder and fsync every file and folder before the rename (checkpoints).
    """
    path = Path(os.path.abspath(path))  # `--out .` / `..` name a folder with a parent to stage beside
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # What a killed atomic_dir of this same folder left (its staging, or the old folder once the new one is in
    # place): every command writing through atomic_dir cleans up after an earlier kill without a start-up call.
    # Only these two kinds, and only this folder's (`.conv.XXXXXXXX.tmp`, not `.conv.geo.XXXXXXXX.tmp` of a
    # sibling being written): train-llava's ranks stage `.<name>.state-partial` just before this call.
    own = re.compile(rf"\.{re.escape(path.name)}\.([a-z0-9_]{{8}}\.tmp|old-\d+)")
    for p in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if own.fullmatch(p.name) and (p.is_dir() or ".old-" in p.name):
            remove_stale_temps(path.parent, (p.name[1:],))
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp.chmod(shared_mode(is_dir=True))
        yield tmp
        share_owner_only_files(tmp)
        if verified:
            write_manifest(tmp)
            fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if verified:
        _fsync_dir(path.parent)  # the rename itself
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# verified folders
# --------------------------------------------------------------------------------------------

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


class ManifestError(ValueError):
    """A verified folder whose files do not match its manifest (missing, truncated, altered, added)."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def contents_fingerprint(path: str | os.PathLike) -> dict:
    """A cheap identity of a model file or folder's contents: a hash of the names, sizes and modification times
    (ns) of its top-level files, never of the weights' bytes (a 14 GB model is fingerprinted in microseconds).

    Writing a model again into the same folder (`merge --overwrite`, a retrained run, `rm -r` + copy) changes
    it; moving the folder (`mv`, `cp -a`) does not. Hidden files (our `.address-llava.json` marker) and `*.md`
    (the model card) are left out: they do not change a single answer. Sub-folders are not entered: a model's
    weights sit at its top level, and a run folder's top-level logs are rewritten whenever its model is.
    Returns {"sha256": first 16 hex digits, "files": how many, "newest": the latest modification time, for
    messages}. Tells which model wrote a file of answers (a rewritten model folder changes it)."""
    path = Path(path)
    if path.is_file():
        entries = [path]
    else:
        entries = sorted((e for e in path.iterdir() if e.is_file() and not e.name.startswith(".")
                          and not e.name.lower().endswith(".md")), key=lambda e: e.name)
    h = hashlib.sha256()
    newest = 0
    for e in entries:
        st = e.stat()
        h.update(f"{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        newest = max(newest, st.st_mtime_ns)
    # UTC: the record must read the same in any time zone
    stamp = datetime.fromtimestamp(newest / 1e9, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if entries else None
    return {"sha256": h.hexdigest()[:16], "files": len(entries), "newest": stamp}


def _files_under(folder: Path) -> list[str]:
    """Relative POSIX paths of every file under folder (the manifest excluded), sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if rel != MANIFEST_FILE:
                out.append(rel)
    return sorted(out)


def write_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Writes folder/manifest.json: {"format", "files": {relative path: {"size", "sha256"}}}; returns it."""
    folder = Path(folder)
    files = {}
    for rel in _files_under(folder):
        p = folder / rel
        files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def verify_manifest(folder: str | os.PathLike, required: bool = True) -> bool:
    """Checks every file of folder against its manifest.json; raises ManifestError naming the first bad file.

    A file that is missing, of another size, of another sha256, or not listed at all (a file planted after
    the save) is an error. Returns False when there is no manifest and `required` is False (folders written
    before manifests existed, or by other tools), True when verified.
    """
    folder = Path(folder)
    mpath = folder / MANIFEST_FILE
    if not mpath.is_file():
        if required:
            raise ManifestError(f"{mpath}: missing (an incomplete checkpoint, or one written before checkpoints "
                                "were verified)")
        return False
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        listed = manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{mpath}: unreadable manifest ({e})") from None
    present = _files_under(folder)
    extra = sorted(set(present) - set(listed))
    if extra:
        raise ManifestError(f"{folder / extra[0]}: not listed in {MANIFEST_FILE} (added after the checkpoint was "
                            "written); refusing to load it")
    for rel, entry in sorted(listed.items()):
        p = folder / rel
        if not p.is_file():
            raise ManifestError(f"{p}: missing (listed in {MANIFEST_FILE})")
        size = p.stat().st_size
        if size != entry.get("size"):
            raise ManifestError(f"{p}: {size} bytes, {MANIFEST_FILE} says {entry.get('size')} (truncated or altered)")
        if sha256_file(p) != entry.get("sha256"):
            raise ManifestError(f"{p}: sha256 differs from {MANIFEST_FILE} (corrupted or altered)")
    return True


def load_error_text(e: BaseException) -> str:
    """One line describing why a checkpoint file did not load: for torch.load(weights_only=True) refusing a
    pickle, say so (torch's own text advises weights_only=False, the very thing not to do)."""
    import pickle

    if isinstance(e, pickle.UnpicklingError):
        return "holds pickled objects beyond plain tensors; refused unread (unpickling them could run code)"
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _fsync_dir(path: Path) -> None:
    # A folder's entries (new names, renames) are durable only once the folder itself is fsynced.
    with contextlib.suppress(OSError):  # some file systems refuse fsync on folders; nothing more to do there
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsyncs every file and folder under folder (itself included), so that a rename after it is durable."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def remove_stale_temps(folder: str | os.PathLike, stems: tuple[str, ...]) -> list[Path]:
    """Removes what killed atomic writes left in folder: `.<stem>*.tmp` (atomic_dir / atomic_write_text
    staging, `.<stem>*.tmp.png` of atomic_write_with), `.<stem>*.state-partial` (train-llava's per-rank staging) and `.<stem>*.old-<pid>` (a
    replaced folder whose new version is in place). Returns the removed paths.

    Call it once at the start of a run, before anything of this run is saved, from one process: a second
    run writing to the same folder at the same time would lose its staging.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        name = p.name
        if not any(name.startswith(f".{s}") for s in stems):
            continue
        stale = ".tmp" in Path(name).suffixes or name.endswith(".state-partial")  # .tmp<suffix>: atomic_write_with
        if ".old-" in name:
            # Killed between the two renames: keep the old folder when the new one is not in place.
            target = folder / name[1:name.index(".old-")]
            stale = target.exists()
        if stale:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@dataclass(frozen=True)
class JsonLine:
    """One non-blank line of a JSON lines file: its decoded `value`, or the reason it is not JSON (`error`)."""

    lineno: int
    value: Any = None
    error: str | None = None


def parse_jsonl(lines: Iterable[str | bytes], start: int = 1) -> Iterator[JsonLine]:
    """A JsonLine per non-blank line (numbered from `start`); a malformed line does not stop the reading, so a
    caller can report it, skip it or stop."""
    for lineno, line in enumerate(lines, start):
        if not line.strip():
            continue
        try:
            yield JsonLine(lineno, json.loads(line))
        except json.JSONDecodeError as e:
            yield JsonLine(lineno, error=f"invalid JSON ({e.msg}, column {e.colno})")
        except UnicodeDecodeError as e:  # bytes input
            yield JsonLine(lineno, error=f"not UTF-8 text ({e.reason} at byte {e.start})")


def iter_jsonl(path: str | os.PathLike) -> Iterator[JsonLine]:
    """The lines of a JSON lines file, streamed (a UTF-8 byte-order mark is ignored)."""
    with open(path, encoding="utf-8-sig") as f:
        yield from parse_jsonl(f)


def read_jsonl(path: str | os.PathLike, error: type[Exception] = ValueError) -> list[dict]:
    """The objects of a JSON lines file; the first malformed line or non-object raises `error` with ONE line
    naming the file and the line."""
    rows = []
    for line in iter_jsonl(path):
        if line.error is None and not isinstance(line.value, dict):
            line = JsonLine(line.lineno, error=f"expected a JSON object, got {type(line.value).__name__}")
        if line.error is not None:
            raise error(f"{path}: line {line.lineno}: {line.error}")
        rows.append(line.value)
    return rows


def cut_jsonl_log(path: str | os.PathLike, step: int) -> int:
    """Keeps the rows of a JSONL metrics log with "step" <= step (a resumed run logs the later steps again);
    a torn last line of a killed run is dropped. Returns the number of rows removed."""
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = {jl.lineno: jl.value for jl in parse_jsonl(lines) if jl.error is None}
    for lineno, line in enumerate(lines, 1):
        try:
            keep = int(rows[lineno]["step"]) <= step
        except (ValueError, KeyError, TypeError):  # blank, torn or foreign lines go
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(f"{x}\n" for x in kept))
    return dropped


class UnsafePathError(ValueError):
    """An image path that is absolute or resolves outside its image root."""


def resolve_under_root(root: str | os.PathLike, relative: str) -> Path:
    """Returns root/relative, refusing absolute paths, `..` escapes and symlinks that leave the root."""
    if not relative:
        raise UnsafePathError("empty image path")
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")):
        raise UnsafePathError(f"image path {relative!r} is absolute; it must be relative to the image root")
    root_resolved = Path(root).resolve()
    full = (root_resolved / rel).resolve()
    if full != root_resolved and root_resolved not in full.parents:
        raise UnsafePathError(f"image path {relative!r} escapes the image root {root}")
    return full


def user_cache_dir(name: str) -> Path:
    """`$XDG_CACHE_HOME` (or ~/.cache) / address-llava / name: where the toolkit's re-computable caches live."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "address-llava" / name
