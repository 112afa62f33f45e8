"""build-dataset's image step: find each image inside the root, read, hash and decode it, and place it.

`check_images` runs in threads; an image is found without escaping the root through symlinks, and, per
`--image-check`, read, hashed (duplicate contents) and decoded (corrupt files), with its EXIF rotation.
`place_image` puts a kept image into the dataset (hard link, copy or symlink; rotated photos stored upright).
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clip_stage.core.fs import UnsafePathError, resolve_under_root
from clip_stage.core.progress import progress as tqdm  # a line every 30 s when not on a terminal
from clip_stage.data.exif_gps import exif_orientation

@dataclass(frozen=True)
class ImageCheck:
    """What the image step found for one row."""

    error: str = ""  # '' = fine
    reason: str = ""  # the reject reason when error is set
    digest: str = ""  # content hash ('' when the file is not read)
    orientation: int = 1  # EXIF orientation (1 = upright or unknown)


def _locate(root: str, rel: str, parents: dict[str, str | None]) -> tuple[Path | None, ImageCheck | None]:
    """(path, None) of an image inside the root, or (None, the reject); `rel` is already normalised.

    A full `resolve_under_root` (one realpath per file) costs more than the whole geocoding at a
    million rows; instead each folder is resolved once (`parents` caches it) and each file is one lstat;
    only a file that is itself a symlink takes the full check.
    """
    folder = posixpath.dirname(rel)
    where = parents.get(folder, "")
    if where == "":
        real = os.path.realpath(os.path.join(root, folder))
        where = parents[folder] = real if (real == root or real.startswith(root + os.sep)) else None
    if where is None:
        return None, ImageCheck(f"image path {rel!r} escapes the image root {root} (through a symlinked folder)", "unsafe_path")
    path = os.path.join(where, posixpath.basename(rel))
    try:
        st = os.lstat(path)
    except OSError:
        return None, ImageCheck("not found", "image_not_found")
    if stat.S_ISLNK(st.st_mode):
        try:
            full = resolve_under_root(root, rel)
        except UnsafePathError as e:
            return None, ImageCheck(str(e), "unsafe_path")
        if not full.is_file():
            return None, ImageCheck("not found", "image_not_found")
        return full, None
    if not stat.S_ISREG(st.st_mode):
        return None, ImageCheck("not a regular file", "image_not_found")
    return Path(path), None


def _check_image(root: str, rel: str, mode: str, parents: dict[str, str | None]) -> ImageCheck:
    """Finds (inside the root, also through symlinks) and, unless mode is none, hashes and decodes one image."""
    path, problem = _locate(root, rel, parents)
    if problem is not None:
        return problem
    if mode == "none":
        return ImageCheck()
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # removed since it was found
        return ImageCheck("not found", "image_not_found")
    except OSError as e:
        return ImageCheck(f"cannot read: {e}", "corrupt_image")
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if mode == "verify":
                im.verify()  # must come straight after open: EXIF is read from a second opening
            else:
                im.load()
                if im.width < 1 or im.height < 1:
                    return ImageCheck("empty image", "corrupt_image", digest)
                orientation = exif_orientation(im)
        if mode == "verify":
            with Image.open(io.BytesIO(data)) as im:
                orientation = exif_orientation(im)
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError...)
        return ImageCheck(f"{type(e).__name__}: {e}", "corrupt_image", digest)
    return ImageCheck("", "", digest, orientation)


def check_images(root: Path, rels: np.ndarray, mode: str, workers: int, progress: bool = False) -> list[ImageCheck]:
    """`_check_image` for every path, in `workers` threads (file reads and PIL decoding release the GIL).

    Paths go to the threads in batches: one future per image costs more than a stat at a million rows.
    """
    batch = 512
    starts = range(0, len(rels), batch)
    out: list[ImageCheck] = []
    real_root = os.path.realpath(root)
    parents: dict[str, str | None] = {}  # shared by the threads: a race only resolves a folder twice
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = pool.map(lambda s: [_check_image(real_root, r, mode, parents) for r in rels[s : s + batch]], starts)
        with tqdm(total=len(rels), desc="images", unit="img", disable=not progress or len(rels) < 2000) as bar:
            for part in jobs:
                out += part
                bar.update(len(part))
    return out


def place_image(src: Path, dst: Path, mode: str, orientation: int = 1) -> None:
    if orientation != 1:  # stored upright, so that no later stage needs to know about EXIF
        from PIL import Image, ImageOps

        with Image.open(src) as im:
            upright = ImageOps.exif_transpose(im)  # also resets the orientation tag in its EXIF
            kw = {"quality": 95} if (im.format or "").upper() in ("JPEG", "WEBP") else {}
            upright.save(dst, format=im.format, exif=upright.getexif(), **kw)
        return
    if mode == "symlink":
        os.symlink(src.resolve(), dst)
        return
    if mode == "hardlink":
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem, or links not supported: copy instead
    shutil.copy2(src, dst)
