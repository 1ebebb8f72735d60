"""Output paths the commands are given, checked before any work: one clear message, nothing left on disk.

`out_dir` refuses a directory flag that names an existing file or lies under one; `out_file` refuses a file
flag that names an existing directory or lies under a file; both refuse a folder this process cannot
write in. `written` turns an OSError met while writing a file into the same kind of message. Torch-free.

Not here: how the files are written (atomically: moekit.fileio and the savers).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


def _error(message: str):
    from ..errors import ConfigError

    return ConfigError(message)


def _first_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_parent(p: Path, flag: str) -> None:
    above = _first_existing(p.parent)
    if not above.is_dir():
        raise _error(f"{flag} {p}: {above} is a file, not a directory: give a path in a directory")
    if not os.access(above, os.W_OK | os.X_OK):
        raise _error(f"{flag} {p}: cannot write in {above} (permission denied): give a path in a writable directory")


def out_dir(path, flag: str = "--out") -> Path:
    """`path` as a directory to write into (new or existing); a ConfigError when it cannot be one."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise _error(f"{flag} {p} is an existing file: give a directory (a new one, or an existing run)")
    _check_parent(p, flag)
    return p


def out_file(path, flag: str = "--out", example: str = "out.csv") -> Path:
    """`path` as a file to (over)write; a ConfigError when it is a directory or cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise _error(f"{flag} {p} is a directory: give a file name, e.g. {p / example}")
    _check_parent(p, flag)
    return p


@contextmanager
def written(path, flag: str = "--out"):
    """Turn an OSError while writing `path` into one message naming the flag and the reason."""
    try:
        yield
    except OSError as e:
        raise _error(f"{flag} {path}: cannot write it: {e.strerror or e}") from None


def positive(value: int, flag: str) -> int:
    if value < 1:
        raise _error(f"{flag} {value} is invalid: it must be an integer >= 1")
    return value


__all__ = ["out_dir", "out_file", "written", "positive"]
