"""Filesystem helpers shared by every stage: atomic writes and image paths that cannot escape their root.

Atomic writes go to a temporary sibling and are `os.replace`d into place, so a killed process leaves
either the old file/folder or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yields a temporary folder beside `path`; on success it replaces `path`, on error it is removed.

    An existing `path` is kept until the new folder is complete (then removed), so an interrupted
    build never leaves a half-written dataset or checkpoint.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
