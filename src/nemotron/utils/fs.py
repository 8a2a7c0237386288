"""Atomic file writes: the one helper every writer of a file that a reader may see uses.

A file is written under a temporary name in the same directory (unique per process and call),
flushed to disk, then renamed over the final name with `os.replace`, which is atomic on POSIX
file systems: a reader sees the previous complete file or the new complete file, never a
half-written one, and a writer killed mid-write leaves only a hidden `.NAME.*.tmp` file behind.

Directories that are built up file by file (checkpoints, exported models, job directories)
follow the same rule at their own level: built under a temporary name, renamed when complete.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block exits normally, the file written
    there (by any writer: `np.save`, `savefig`, ...) is flushed and renamed to `path`. On an
    exception the temporary file is removed and `path` is left as it was. Parent directories
    are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> Path:
    """Write `data` to `path` atomically (see the module docstring); returns `path`."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = True) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see the module docstring); returns `path`."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)
