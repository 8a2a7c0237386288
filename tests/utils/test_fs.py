"""The atomic-write helper: complete files only, the old file kept on failure, no debris."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from nemotron.utils import fs
from nemotron.utils.fs import atomic_path, atomic_write_bytes, atomic_write_text, publish_dir


def test_writes_text_and_bytes_and_creates_parents(tmp_path: Path):
    target = tmp_path / "a" / "b" / "file.json"
    assert atomic_write_text(target, "{}\n") == target
    assert target.read_text() == "{}\n"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]


def test_failure_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "state.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the ne")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.txt"]


def test_any_writer_through_the_temporary_path(tmp_path: Path):
    target = tmp_path / "x.npy"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.npy.") and not target.exists()
        with open(tmp, "wb") as f:
            np.save(f, np.arange(3))
    assert np.load(target).tolist() == [0, 1, 2]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _built(parent: Path, files: dict[str, bytes]) -> Path:
    built = parent / ".out.tmp-new"
    for name, data in files.items():
        (built / name).parent.mkdir(parents=True, exist_ok=True)
        (built / name).write_bytes(data)
    return built


def test_publish_dir_puts_the_new_directory_in_place_of_the_old(tmp_path: Path):
    out = tmp_path / "out"
    publish_dir(_built(tmp_path, {"a": b"1", "d/b": b"2"}), out)
    assert _tree(out) == {"a": b"1", "d/b": b"2"}
    publish_dir(_built(tmp_path, {"c": b"3"}), out)
    assert _tree(out) == {"c": b"3"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the earlier one is gone, no debris


def test_publish_dir_a_failed_removal_of_the_old_costs_only_the_old(tmp_path: Path, monkeypatch):
    """Removing the earlier directory fails part-way (a file it may not delete; a kill): the
    new directory is in place, complete (it used to be lost with half of the old one)."""
    out = tmp_path / "out"
    publish_dir(_built(tmp_path, {"a": b"old", "b": b"old"}), out)

    def remove_half(path, ignore_errors=False, **kwargs):
        sorted(Path(path).iterdir())[0].unlink()
        if not ignore_errors:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fs.shutil, "rmtree", remove_half)
    publish_dir(_built(tmp_path, {"a": b"new", "b": b"new"}), out)
    assert _tree(out) == {"a": b"new", "b": b"new"}


def test_publish_dir_a_failed_rename_keeps_the_old(tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    publish_dir(_built(tmp_path, {"a": b"old"}), out)
    built = _built(tmp_path, {"a": b"new"})
    real = os.replace

    def failing(src, dst):
        if Path(src) == built:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(fs.os, "replace", failing)
    monkeypatch.setattr(fs, "_exchange", lambda a, b: False)  # the two-rename path
    with pytest.raises(OSError, match="No space"):
        publish_dir(built, out)
    assert _tree(out) == {"a": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-new", "out"]  # the caller's to remove


def test_publish_dir_replaces_a_link_not_its_target(tmp_path: Path):
    target = _built(tmp_path, {"keep": b"1"}).rename(tmp_path / "target")
    out = tmp_path / "out"
    out.symlink_to(target)
    publish_dir(_built(tmp_path, {"a": b"new"}), out)
    assert not out.is_symlink() and _tree(out) == {"a": b"new"}
    assert _tree(target) == {"keep": b"1"}


def test_a_write_that_fails_names_the_file(tmp_path: Path, monkeypatch):
    """A failed write() names no file: a full disk was the bare "[Errno 28] No space left on
    device" (data prep's one-line error said nothing of where). Same errno, same subclass."""
    target = tmp_path / "plan.json"
    atomic_write_text(target, "old")

    def disk_full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError) as failure:
        atomic_write_text(target, "new")
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(target)
    assert str(target) in str(failure.value)
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    with pytest.raises(PermissionError) as denied:  # the subclass of the errno, as before
        with fs.naming(target):
            raise OSError(errno.EACCES, "Permission denied")
    assert denied.value.filename == str(target)
    with pytest.raises(FileNotFoundError) as named:  # a file already named stays as it is
        with fs.naming(target):
            open(tmp_path / "missing")
    assert named.value.filename == str(tmp_path / "missing")


# A child process that publishes `new` over `out` and is killed (SIGKILL, by itself) at the
# N-th os.replace of the publish: the kill -9 of a real run, at a chosen point.
_KILLED_PUBLISH = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from nemotron.utils import fs
    built, out, nth, exchange = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if exchange == "no":
        fs._exchange = lambda a, b: False
    def rmtree_killed(path, ignore_errors=False):  # (nth 0) killed removing the earlier copy
        sorted(Path(path).iterdir())[0].unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    if nth == 0:
        fs.shutil.rmtree = rmtree_killed
    real, calls = os.replace, []
    def replace(src, dst):
        calls.append(src)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    fs.os.replace = replace
    fs.publish_dir(built, out)
    """
)


def _publish_killed(tmp_path: Path, built: Path, out: Path, nth: int, exchange: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    args = [sys.executable, "-c", _KILLED_PUBLISH, str(built), str(out), str(nth), exchange]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr


def _can_exchange(tmp_path: Path) -> bool:
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.mkdir()
    try:
        return fs._exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


def test_publish_dir_killed_after_the_swap_leaves_the_new_directory(tmp_path: Path):
    """kill -9 right after the earlier `out` and `built` were swapped (before the earlier copy
    is removed): `out` is the new directory, complete; the earlier copy is hidden debris under
    the caller's temporary name (as a writer killed mid-write leaves). With two renames, `out`
    was missing after a kill at this point."""
    if not _can_exchange(tmp_path):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    out = tmp_path / "out"
    publish_dir(_built(tmp_path, {"a": b"old"}), out)
    _publish_killed(tmp_path, _built(tmp_path, {"a": b"new", "b": b"new"}), out, 1, "yes")
    assert _tree(out) == {"a": b"new", "b": b"new"}
    assert _tree(tmp_path / ".out.tmp-new") == {"a": b"old"}


def test_publish_dir_killed_between_its_renames_gets_the_earlier_back(tmp_path: Path):
    """Where the swap is not available (two renames), kill -9 between them leaves no `out`:
    the earlier directory, moved aside, was never put back (an earlier export lost to the
    user, and its disk space with it). The next writer's refuse_non_empty restores it, so a
    rerun without --overwrite is refused as before the kill, and one with it replaces it."""
    out = tmp_path / "out"
    publish_dir(_built(tmp_path, {"a": b"old"}), out)
    _publish_killed(tmp_path, _built(tmp_path, {"a": b"new"}), out, 2, "no")
    assert not out.exists()
    with pytest.raises(FileExistsError, match="not empty"):
        fs.refuse_non_empty(out, overwrite=False)
    assert _tree(out) == {"a": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-new", "out"]  # the new one: the caller's


def test_an_earlier_copy_whose_removal_was_cut_short_is_never_put_back(tmp_path: Path):
    """Killed while removing the earlier `out` (the new one in place), then `out` deleted by
    hand: the next writer does not put the half-removed copy back as `out` (it goes)."""
    out = tmp_path / "out"
    publish_dir(_built(tmp_path, {"a": b"old", "b": b"old"}), out)
    _publish_killed(tmp_path, _built(tmp_path, {"a": b"new"}), out, 0, "no")
    assert _tree(out) == {"a": b"new"}
    fs.shutil.rmtree(out)
    fs.refuse_non_empty(out, overwrite=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from nemotron.utils.fs import exclusive_lock

    with exclusive_lock(sys.argv[1], "holder 1") as locked:
        print("locked" if locked else "no locks", flush=True)
        time.sleep(600)
    """
)


def test_exclusive_lock_refuses_while_held_and_frees_when_its_holder_dies(tmp_path: Path):
    path = tmp_path / "work" / "lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(fs.LockBusy) as busy:
            with fs.exclusive_lock(path, "holder 2"):
                pytest.fail("locked a lock held by another process")
        assert busy.value.holder == "holder 1" and busy.value.path == path
        assert path.read_text() == "holder 1"  # the refused one wrote nothing
    finally:
        holder.kill()  # (SIGKILL: nothing of its own releases the lock)
        holder.wait()
    with fs.exclusive_lock(path, "holder 2") as locked:
        assert locked and path.read_text() == "holder 2"
        with pytest.raises(fs.LockBusy):  # another open file of this process: excluded too
            with fs.exclusive_lock(path, "holder 3"):
                pass


def test_exclusive_lock_follows_a_lock_file_replaced_while_taking_it(tmp_path: Path, monkeypatch):
    """A holder ending removes the lock file (with its directory) while holding it; a process
    that opened the removed file just before locks it once freed, and must then see that it
    excludes nobody and take the file now at the path."""
    path = tmp_path / "work" / "lock"
    flock, calls = fs.fcntl.flock, []

    def replaced_first(fd, operation):
        if not calls:  # between this process's open and its flock, the holder ended
            path.unlink()
            path.parent.rmdir()
        calls.append(fd)
        return flock(fd, operation)

    monkeypatch.setattr(fs.fcntl, "flock", replaced_first)
    with fs.exclusive_lock(path, "me") as locked:
        assert locked and len(calls) == 2 and path.read_text() == "me"
        monkeypatch.setattr(fs.fcntl, "flock", flock)
        with pytest.raises(fs.LockBusy):  # the file at the path is the one held
            with fs.exclusive_lock(path, "other"):
                pass


def test_refuse_non_empty_names_a_file_on_the_path(tmp_path: Path):
    """A file where OUT's directory (or a parent) would be: refused by the check the writers and
    the CLI make before their work, naming OUT and the file (mkdir said only "File exists")."""
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "deeper" / "out"
    assert fs.blocking_file(out) == tmp_path / "a_file"
    assert fs.blocking_file(tmp_path / "new" / "out") is None and fs.blocking_file(tmp_path) is None
    with pytest.raises(
        NotADirectoryError, match=rf"^{out}: {tmp_path / 'a_file'} is a file, not a directory$"
    ):
        fs.refuse_non_empty(out, overwrite=True)
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        fs.refuse_non_empty(tmp_path / "a_file", overwrite=True)
    assert (tmp_path / "a_file").read_text() == "x"


def test_overwrite_is_narrowed_to_the_writers_earlier_output(tmp_path: Path):
    """`earlier_output` says whether a non-empty `out` is the writer's own earlier output:
    only then does `overwrite` let it be replaced. An empty or absent `out` is never asked
    about, and without `overwrite` the refusal is the plain "not empty" one."""
    asked: list[Path] = []

    def only_marked(out: Path) -> str | None:
        asked.append(out)
        return None if (out / "marker").exists() else "is not an earlier output (no marker)"

    out = tmp_path / "out"
    fs.refuse_non_empty(out, overwrite=True, earlier_output=only_marked)
    out.mkdir()
    fs.refuse_non_empty(out, overwrite=True, earlier_output=only_marked)
    assert asked == []
    (out / "data.bin").write_bytes(b"x")
    with pytest.raises(fs.NotEarlierOutput, match=rf"^{out}: is not an earlier output \(no marker\)$"):
        fs.refuse_non_empty(out, overwrite=True, earlier_output=only_marked)
    with pytest.raises(FileExistsError, match="exists and is not empty$") as refused:
        fs.refuse_non_empty(out, overwrite=False, earlier_output=only_marked)
    assert not isinstance(refused.value, fs.NotEarlierOutput)
    (out / "marker").write_text("")
    fs.refuse_non_empty(out, overwrite=True, earlier_output=only_marked)
    assert asked == [out, out] and (out / "data.bin").exists()
