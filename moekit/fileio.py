"""Files written and read safely: a directory written atomically, a JSON file read with one clear error.

`atomic_directory` is how every saver (checkpoints, moekit.hf.save, moefy, quantized checkpoints) writes a
directory: into a hidden temporary directory beside it, renamed into place at the end, removed on any error,
so nothing half-written is ever left. `read_json` reads a JSON file and turns "missing" or "not JSON" into one
error of the caller's class with the caller's words. Torch-free (moekit.config uses it).

Not here: what goes into those directories (moekit.checkpoints, moekit.hf, moekit.moefy), tensors files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


@contextmanager
def atomic_directory(final: Path, *, prefix: str | None = None, fsync: bool = False,
                     move: Callable[[Path, Path], None] | None = None) -> Iterator[Path]:
    """Yield a new hidden temporary directory beside `final` to write into; when the block ends without an error it
    is (fsynced when `fsync`, then) moved into place by `move(tmp, final)`, by default renamed over an empty or
    missing `final`. On any error the temporary directory is removed, so nothing half-written is left.
    `prefix` names it (default `.tmp-<final's name>-`)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f"{TMP_PREFIX}{final.name}-", dir=final.parent))
    try:
        yield tmp
        honour_umask_tree(tmp)  # mkdtemp makes it 0700 (and some writers 0600 files): the modes mkdir/open give
        if fsync:
            fsync_tree(tmp)
        (move or _replace_empty)(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process's umask (read from /proc where there is one; else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give a file made by tempfile.mkstemp (0600) the mode a plain open() would have given it (0666 less the umask)."""
    os.chmod(path, 0o666 & ~current_umask())


def honour_umask_tree(directory: Path) -> None:
    """`directory` and every directory below it 0777 less the umask, every file 0666 less the umask."""
    mask = current_umask()
    for path in [directory, *directory.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _replace_empty(tmp: Path, final: Path) -> None:
    if final.exists():
        final.rmdir()
    os.rename(tmp, final)


def fsync_tree(directory: Path) -> None:
    """fsync every file below `directory`, then the directory."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """fsync a directory (its entries), where the platform can."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories (Windows) have no directory fsync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: Path, error: type[Exception], missing: str | None, invalid: str | None = None) -> Any:
    """The JSON in `path`, or one `error` naming the problem.

    `missing`: the message when there is no such file (None: return None then); `invalid`: the message's start
    when the file is not JSON (default `<path> is not valid JSON`), followed by `: <the parser's complaint>`.
    """
    if not path.is_file():
        if missing is None:
            return None
        raise error(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{invalid or f'{path} is not valid JSON'}: {e}") from None
