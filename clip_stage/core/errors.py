"""One-line user errors for every command: the guard around each `main(argv)`.

    @command_main("train-llava")
    def main(argv=None) -> int: ...

A user error (a bad file, record, image, network or checkpoint, an empty input) escapes a command as one of
the project's own `ValueError` subclasses (RecordError, DataCheckError, CheckpointError, ...), as a missing
or unreadable file (FileNotFoundError, PermissionError, ...), as an image PIL cannot identify, or as
`SystemExit("message")`. The guard prints it as ONE line, `PROG: error: MESSAGE`, and returns 2. Anything
else is a bug and keeps its traceback. `--debug` anywhere before a `--` on the command line (it is taken out
of argv) or `ADDRESS_LLAVA_DEBUG=1` shows the traceback of user errors too. A closed stdout
(`address-llava dataset-summary | head`) ends the command quietly; Ctrl-C ends it with one line and 130.

Lives in clip_stage (the lowest floor) so that every stage can use it; `llava_address.apps.cli` applies the same
guard around the dispatch, so a command reached through `address-llava` is covered even without it.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

DEBUG_ENV = "ADDRESS_LLAVA_DEBUG"
DEBUG_FLAG = "--debug"
# Exception classes defined in these packages and derived from ValueError are user errors by convention:
# every `XxxError(ValueError)` of the project is raised for bad input and carries a message naming it.
PROJECT_PACKAGES = ("clip_stage", "llava_address", "conversations")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def take_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """argv without `--debug` (only before a `--`, where it cannot be a value for the command), and whether it was there."""
    end = argv.index("--") if "--" in argv else len(argv)
    if DEBUG_FLAG not in argv[:end]:
        return argv, False
    return [a for i, a in enumerate(argv) if not (i < end and a == DEBUG_FLAG)], True


def _package_of(cls: type) -> str:
    """The top package a class is defined in; `python -m clip_stage.x` defines x's classes in `__main__`."""
    module = cls.__module__
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else module
    return module.split(".")[0]


def _is_project_value_error(e: BaseException) -> bool:
    return isinstance(e, ValueError) and any(
        issubclass(c, ValueError) and _package_of(c) in PROJECT_PACKAGES for c in type(e).__mro__)


def is_user_error(e: BaseException) -> bool:
    """True for the exceptions that describe a bad input rather than a bug."""
    if _is_project_value_error(e):
        return True
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)):
        return True
    if isinstance(e, OSError) and getattr(e, "filename", None):  # disk full, too many links...: names its file
        return True
    pa = sys.modules.get("pyarrow")  # only loaded if the command read a table: then its errors name the file
    if pa is not None and isinstance(e, pa.ArrowInvalid):
        return True
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - Pillow is a core dependency
        return False
    return isinstance(e, (UnidentifiedImageError, Image.DecompressionBombError))


def one_line(e: BaseException) -> str:
    """The message of `e` on one line (OS errors as `FILE: reason`)."""
    if isinstance(e, OSError) and getattr(e, "filename", None) and e.strerror:
        text = f"{e.filename}: {e.strerror}" + (f" -> {e.filename2}" if getattr(e, "filename2", None) else "")
    else:
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text or type(e).__name__


def report(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


def _quiet_broken_pipe() -> None:
    # Python's own advice: point stdout at devnull so that the flush at exit does not raise a second time.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout replaced (tests capture it): nothing to redirect
        pass


def run_guarded(prog: str, fn: Callable[..., int | None], argv: list[str], *args, **kwargs) -> int:
    """`fn(argv, ...)` with user errors turned into one line on stderr and exit status 2."""
    argv, flag = take_debug_flag(list(argv))
    debug = flag or debug_enabled()
    before = os.environ.get(DEBUG_ENV)
    if flag:
        os.environ[DEBUG_ENV] = "1"  # commands run in-process by this one (the demo) show tracebacks too
    try:
        return int(fn(argv, *args, **kwargs) or 0)
    except SystemExit as e:
        if isinstance(e.code, str):  # SystemExit("message") would exit 1 with the bare message
            if debug:
                raise
            report(prog, one_line(SystemExit(e.code)))
            return EXIT_USER_ERROR
        raise
    except BrokenPipeError:
        _quiet_broken_pipe()
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug or not is_user_error(e):
            raise
        report(prog, one_line(e))
        return EXIT_USER_ERROR
    finally:
        if flag:  # only for the duration of this command: an in-process caller's later commands are unaffected
            if before is None:
                os.environ.pop(DEBUG_ENV, None)
            else:
                os.environ[DEBUG_ENV] = before


def command_main(prog: str):
    """Decorator for a command's `main(argv=None, ...)`: the guard of `run_guarded` around it."""

    def wrap(fn):
        @functools.wraps(fn)
        def main(argv: list[str] | None = None, *args, **kwargs) -> int:
            return run_guarded(prog, fn, sys.argv[1:] if argv is None else argv, *args, **kwargs)

        return main

    return wrap
