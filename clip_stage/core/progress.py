"""Progress bars that suit both a terminal and a log file: `progress(iterable, desc=..., total=...)`.

    for batch in progress(loader, desc="train", unit="step"):
        ...

On a terminal it is tqdm's animated bar. When stderr is not a terminal (a log file, a CI job, `nohup`), the
bar's carriage-return frames would fill the log with thousands of overwritten lines; there it prints one plain
line at most every `LOG_INTERVAL_S` seconds (and at the end) instead. `ADDRESS_LLAVA_PROGRESS_INTERVAL`
(seconds) changes that interval.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class LineStream:
    """A file for tqdm that turns every `\\r` frame into one plain line (and drops its bare newlines)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> int:
        text = s.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream=None) -> bool:
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def progress(iterable=None, *, desc: str | None = None, total: int | None = None, unit: str = "it",
             disable: bool = False, file=None, **kwargs) -> tqdm:
    """A tqdm bar over `iterable` (or a manual one with `total`): animated on a terminal, a line every
    LOG_INTERVAL_S seconds otherwise. Extra keyword arguments go to tqdm."""
    stream = file if file is not None else sys.stderr
    if is_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, file=stream, **kwargs)
    interval = float(os.environ.get("ADDRESS_LLAVA_PROGRESS_INTERVAL", LOG_INTERVAL_S))
    kwargs.setdefault("mininterval", interval)
    kwargs.setdefault("maxinterval", max(interval, kwargs["mininterval"]))
    kwargs.setdefault("miniters", 1)  # time, not a count of iterations, decides when a line is written
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, file=LineStream(stream),
                ascii=True, ncols=100, **kwargs)
