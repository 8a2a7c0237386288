"""Atomic file writes: the one helper every writer of a file that a reader may see uses; and
the one reader of a user's text files (`read_text`, `read_json`), whose every failure is one
error naming the file.

A file is written under a temporary name in the same directory (unique per process and call),
flushed to disk, then renamed over the final name with `os.replace`, which is atomic on POSIX
file systems: a reader sees the previous complete file or the new complete file, never a
half-written one, and a writer killed mid-write leaves only a hidden `.NAME.*.tmp` file behind.

Temporaries (files, and the directories of `temporary_dir`) are named
`.NAME.<host>.<start>.<pid>-<random>.tmp`: <host> a hash of the host name, boot and pid
namespace of the writer, <start> its process start time, <pid> its process id. So the name
alone (created in one step with the file, no marker to write after it) says whose it is, and
`remove_stale_temporaries` removes those whose writer is provably gone: a writer of this host
(same boot, same pid namespace) whose process no longer exists, or is another process now (its
start time differs), or a zombie. A temporary of another host (a shared file system: its pid
cannot be checked there), of a live process, of unknown origin, or named otherwise is left.

Directories that are built up file by file (checkpoints, exported models, job directories)
follow the same rule at their own level: built under a temporary name, renamed when complete
(`publish_dir` when an earlier one may be there); `apply_default_modes` gives such a directory
the modes a plain mkdir/open would have.

A process that must be the only one at work in a directory for a while (a data prep in its
output directory, a training run in its checkpoint directory) holds `exclusive_lock` on a file
there: an flock, which the kernel releases when the holder exits however it ends (kill -9
included), also across the hosts of a shared file system that supports locks. A name alone cannot say that: a temporary's writer on another
host can never be proved gone, so its work could be neither taken over nor cleaned.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "apply_default_modes",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "LockBusy",
    "current_umask",
    "exclusive_lock",
    "free_space_note",
    "naming",
    "publish_dir",
    "read_json",
    "read_text",
    "remove_stale_temporaries",
    "temporary_dir",
    "temporary_name",
]


_UNKNOWN_HOST = "0" * 12  # a system without a boot id: its temporaries are never removed
_TEMPORARY = re.compile(
    r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{12})\.(?P<start>\d+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$"
)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _process_stat(pid: int | str) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None when there
    is no such process (or no /proc)."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


@functools.cache
def _host_token() -> str:
    """This host, boot and pid namespace, hashed: pids are comparable only between processes
    sharing all three (a container has its own pid namespace on the same host and boot)."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = None
    if not boot or not namespace:
        return _UNKNOWN_HOST
    digest = hashlib.sha256(f"{socket.gethostname()}\0{boot}\0{namespace}".encode()).hexdigest()[:12]
    return digest if digest != _UNKNOWN_HOST else "1" + digest[1:]


def _owner_token() -> str:
    """`<host>.<start>.<pid>` of this process (the start read each time: a fork is another
    process, with its own pid and start)."""
    stat = _process_stat("self")
    return f"{_host_token()}.{stat[1] if stat else 0}.{os.getpid()}"


def temporary_name(path: Path) -> Path:
    """A new hidden name beside `path` for a temporary of it (unique per process and call)."""
    return path.with_name(f".{path.name}.{_owner_token()}-{uuid.uuid4().hex[:8]}.tmp")


def _writer_gone(host: str, start: int, pid: int) -> bool:
    """Whether the writer of a temporary named with (`host`, `start`, `pid`) is provably no
    longer running. Only on its own host can that be known; anything uncertain is "running"."""
    if host == _UNKNOWN_HOST or host != _host_token():
        return False  # another host (a shared file system), or a system without /proc
    if pid == os.getpid():
        return False  # this process: a temporary it may be writing now (another thread)
    stat = _process_stat(pid)
    if stat is None:
        return os.path.isdir("/proc/self")  # no such process (/proc readable: not a doubt)
    state, started = stat
    if state in ("Z", "X"):
        return True  # killed, not yet reaped: it writes nothing any more
    return start != 0 and started != start  # another process has the pid now (0: start unknown)


def remove_stale_temporaries(directory: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Remove the temporaries (`atomic_path` files, `temporary_dir` directories) in `directory`
    whose writer is provably gone (see the module docstring): those of `name` only, or all when
    None. Returns what was removed. Entries named otherwise, a link, those of a live or
    unknowable writer are left; an entry that cannot be removed is left too (it is only space)."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:  # none, or one that cannot be listed: nothing to remove
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        if not _writer_gone(match["host"], int(match["start"]), int(match["pid"])):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:  # a file (or a link a writer never makes: the name is ours, its target is not)
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def temporary_dir(out: str | os.PathLike[str], *, sweep: bool = False) -> Path:
    """Create (mode 0700, as `tempfile.mkdtemp`) and return a new hidden directory beside `out`,
    named as a temporary of `out` (see the module docstring), for a directory to be built and
    then renamed to `out` (`publish_dir`). The temporaries of `out` that earlier writers killed
    part-way left there are removed first (`remove_stale_temporaries`); with `sweep`, those of
    any name (for outputs named anew by each run: job directories, cache entries). Parent
    directories are created."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent, None if sweep else out.name)
    while True:
        path = temporary_name(out)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:  # (a random suffix seen before: draw another)
            continue
        return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """An OSError raised in the block that names no file gets `path` as its file (same errno,
    so the same subclass). A failed write() names none: a full disk would otherwise be the
    bare "[Errno 28] No space left on device", with nothing saying where."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, os.fspath(path)) from e
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block exits normally, the file written
    there (by any writer: `np.save`, `savefig`, ...) is flushed and renamed to `path`. On an
    exception the temporary file is removed and `path` is left as it was. Parent directories
    are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with naming(path):
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


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
# errnos of a renameat2 that this kernel or file system does not do (nothing was changed)
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


@functools.cache
def _renameat2() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux, or a C library without it (glibc < 2.28)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`): True
    when done; False, with nothing changed, where the system or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _hidden(out: Path, kind: str) -> Path:
    """A hidden sibling of `out` for an earlier copy of it: `old` (set aside whole, put back
    if the publish does not complete) or `del` (being deleted)."""
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _hidden_copies(out: Path, kind: str) -> list[Path]:
    """The `_hidden(out, kind)` copies still there: a publish, or a removal, killed part-way."""
    prefix = f".{out.name}.{kind}-"
    try:
        return sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix))
    except OSError:  # no parent (nothing was published there), or one that cannot be listed
        return []


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():  # a link (its target is not ours) or a file
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _discard(copy: Path, out: Path) -> None:
    """Delete an earlier copy of `out`: renamed to a `del` name first, so that a removal cut
    short never leaves half a copy under a name that `refuse_non_empty` would put back."""
    doomed = _hidden(out, "del")
    try:
        os.replace(copy, doomed)
    except OSError:
        doomed = copy
    _remove(doomed)


def publish_dir(built: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Put the complete directory `built` (a sibling of `out`) at `out`, replacing what is there;
    returns `out`.

    An earlier `out` is swapped with `built` in one atomic step where the system can (Linux
    `renameat2(RENAME_EXCHANGE)`), so a process killed at any moment leaves `out` the earlier
    or the new directory, complete. Elsewhere it is renamed aside to a hidden sibling first;
    a kill between that rename and the next leaves no `out`, and the next `refuse_non_empty`
    of `out` (every writer's first step) puts the earlier one back. The earlier copy is removed
    only once `built` is in place (its removal failing or being cut short costs only that
    hidden copy, which the next `refuse_non_empty` removes). Removing it in place first would
    lose both when the removal failed part-way (a file it may not delete, a kill): the earlier
    output half-deleted, and the caller discarding the new one. A rename that fails puts the
    earlier `out` back."""
    built, out = Path(built), Path(out)
    if not (out.exists() or out.is_symlink()):
        os.replace(built, out)
        return out
    if _exchange(built, out):
        _discard(built, out)  # `built` names the earlier out now
        return out
    aside = _hidden(out, "old")
    os.replace(out, aside)
    try:
        os.replace(built, out)
    except BaseException:
        os.replace(aside, out)
        raise
    _discard(aside, out)
    return out


class LockBusy(Exception):
    """`exclusive_lock(path)` is held by another process, which wrote `holder` into the lock
    file (empty if it had not yet, or it cannot be read)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path}: locked by another process: {holder or 'unknown'}")
        self.path, self.holder = path, holder


# errnos of an flock that this file system does not do (some network file system mounts)
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


def _lock_once(path: Path, holder: str) -> int | None:
    """One try of `exclusive_lock`: the locked fd; None when the file at `path` changed under
    us (removed, or removed and created anew, by a holder ending); -1 where the file system has
    no locks."""
    try:
        # O_NOFOLLOW: a symbolic link put where the lock file belongs is not followed (the
        # holder's record was written over whatever file it pointed at).
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
    except FileNotFoundError:  # its directory was being removed by a holder ending: look again
        path.parent.mkdir(parents=True, exist_ok=True)
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(
                e.errno, "a symbolic link where the lock file belongs; remove it", os.fspath(path)
            ) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device put there
            raise OSError(
                errno.EINVAL, "not a regular file where the lock file belongs; remove it", os.fspath(path)
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:  # (its own description:
                    text = f.read().strip()  # closing it does not release an flock of ours)
            except OSError:
                text = ""
            raise LockBusy(path, text) from None
        except OSError as e:
            if e.errno in _NO_LOCKS:
                os.close(fd)
                return -1
            raise OSError(e.errno, e.strerror, os.fspath(path)) from None
        # A holder ending may remove the file (with its directory) while holding it: the file
        # locked here is then no longer the one at `path`, and a lock on it excludes nobody.
        try:
            here, there = os.fstat(fd), os.stat(path)
        except FileNotFoundError:
            os.close(fd)
            return None
        if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode("utf-8"), 0)
        return fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str], holder: str) -> Iterator[bool]:
    """Hold an exclusive lock (flock) on the file `path` (created, parents too) for the block,
    with `holder` (who holds it, for the message of another process refused) written into it.
    Another process holding it: `LockBusy`, at once (no wait). Yields True; False where the
    file system has no locks (nothing is held then: the caller says so).

    The holder may remove the file, or its directory, before the block ends (a directory that
    must not outlive the work); one that locked the removed file then looks again."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        fd = _lock_once(path, holder)
        if fd is not None:
            break
    else:  # (removed and created anew 100 times in a row: not a holder ending)
        raise OSError(errno.EAGAIN, "lock file keeps being replaced", os.fspath(path))
    if fd == -1:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)  # releases the lock


def free_space_note(directory: str | os.PathLike[str]) -> str:
    """ "; N MiB were free there", for the message of a write that failed (empty when unknown):
    a full disk does not always surface as ENOSPC (torch's zip writer reports a short write
    as "unexpected pos", safetensors as an I/O error)."""
    try:
        return f"; {shutil.disk_usage(directory).free / 2**20:,.1f} MiB were free there"
    except OSError:
        return ""


_umask_lock = threading.Lock()


def blocking_file(path: str | os.PathLike[str]) -> Path | None:
    """What keeps `path` from being (made) a directory: `path` itself or its nearest existing
    parent when that is not a directory (a file; mkdir then fails with a bare "File exists"
    naming the file, not `path`). None when the directory exists or can be made."""
    for candidate in (Path(path), *Path(path).parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


class NotEarlierOutput(FileExistsError):
    """`refuse_non_empty(out, overwrite=True, earlier_output=...)`: `out` holds something other
    than an earlier output of the same writer, so it is not replaced."""


def refuse_non_empty(
    out: str | os.PathLike[str], overwrite: bool, earlier_output: Callable[[Path], str | None] | None = None
) -> None:
    """An output directory that already holds something is replaced only when asked
    (`overwrite`): FileExistsError otherwise. Checked by the writers, and by the CLI before
    the long read and conversion that come before the write.

    `earlier_output(out)` (None when `out` is an earlier output of the writer; otherwise why
    not, e.g. "is not an earlier export (holds no config.json)") narrows `overwrite` to
    directories the writer made: a mistyped OUT (a data or run directory) is refused,
    `NotEarlierOutput`, instead of being replaced whole.

    First, what a `publish_dir` of `out` killed part-way left is settled: with no `out`, the
    earlier copy it had moved aside whole is put back (then refused or replaced as any
    other); with an `out`, such copies are removed (the publish had completed), as are those
    whose removal was cut short (never put back: they may be half deleted)."""
    out = Path(out)
    asides = _hidden_copies(out, "old")
    if asides and not (out.exists() or out.is_symlink()):
        os.replace(asides.pop(), out)
    for copy in asides:
        _discard(copy, out)
    for copy in _hidden_copies(out, "del"):
        _remove(copy)
    blocker = blocking_file(out)
    if blocker == out:  # never replaced: a file is no earlier output
        raise FileExistsError(f"{out}: exists and is not a directory")
    if blocker is not None:  # found before the work whose result could then not be written
        raise NotADirectoryError(f"{out}: {blocker} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out}: exists and is not empty")
        if earlier_output is not None and (instead := earlier_output(out)) is not None:
            raise NotEarlierOutput(f"{out}: {instead}")


def current_umask() -> int:
    """The process umask (read by setting and restoring it, under a lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_default_modes(root: str | os.PathLike[str]) -> None:
    """Give `root` and everything under it the modes a plain mkdir/open would have: 0777 for
    directories and 0666 for files, less the umask (0755 / 0644 under the usual 022).

    `tempfile.mkdtemp` creates its directory 0700 (and some writers create files 0600); a
    directory assembled there and renamed into place would otherwise stay private."""
    mask = current_umask()
    root = Path(root)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def read_text(path: str | os.PathLike[str], error: Callable[[str], Exception], what: str = "file") -> str:
    """The UTF-8 text of a user's file (`what`: e.g. "YAML file"; a leading byte-order mark,
    which some editors write, skipped). Any failure raises one `error(message)` naming the file:
    not found, a directory, unreadable, or not UTF-8 (with the line of the first bad byte)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(f"{path}: not UTF-8 text at line {line} (byte {exc.start}: {exc.reason})") from None


class _DuplicateKey(Exception):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of a repeated key: {"weight": 1, "weight": 2} read as 2 unseen.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def read_json(
    path: str | os.PathLike[str], error: Callable[[str], Exception], what: str = "JSON file"
) -> Any:
    """The parsed JSON of a user's file (`read_text`'s errors, and invalid JSON with its line and
    column, nested too deeply for the parser, a number past Python's integer-parsing limit or a
    key given twice in one object, as one `error` naming the file)."""
    text = read_text(path, error, what)
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKey as exc:
        raise error(f"{path}: invalid JSON: key {exc.args[0]!r} appears twice in one object") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise error(f"{path}: invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # a number past Python's integer-parsing limit (4,300 digits)
        raise error(f"{path}: invalid JSON ({exc})") from None
