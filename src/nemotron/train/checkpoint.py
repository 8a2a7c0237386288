"""Checkpoints with torch.distributed.checkpoint (DCP): save, find, load, keep-last, async.

Layout of a save directory:

    SAVE/iter_0000100/          one complete checkpoint
        .metadata, *.distcp       DCP: "model" (incl. expert biases) and "optimizer" state
                                  (keyed by parameter name, group settings too), resharded on
                                  load, so a checkpoint saved with one parallel layout loads
                                  into another
        train_state.json          step, tokens, loader position (consumed samples per split),
                                  blend phase, fault counters
        rng/rank_00000.pt         python, numpy, torch (and CUDA) RNG states of each rank
        config.json               the run's config (export rebuilds the model from it)
        ModelArtifact-pretrain.json   lineage manifest (artifacts/model.py)
        manifest.json             size and SHA-256 of every other file; written last
    SAVE/latest                 name of the newest complete checkpoint
    SAVE/.tmp-iter_0000200/     a save in progress: never looked at by resume
    SAVE/.lock                  held (flock) by the run saving here, removed when it ends

A checkpoint is written under `.tmp-<name>`; once every file is written their sizes and
checksums go into `manifest.json` (the work spread over the ranks), `latest` (itself written to
a temporary name and renamed) is pointed at `<name>`, and the directory is renamed to `<name>`.
A process killed at any moment leaves the previous checkpoint intact; killed after the
manifest, its complete checkpoint is renamed into place, `latest` naming it, at the next start
(`finish_interrupted_saves`), so resume never passes over a complete newer checkpoint.

Before a checkpoint is loaded its files are checked against its manifest (`verify_checkpoint`).
A damaged checkpoint given by name is an error naming the file; a save directory resumes from
its newest intact checkpoint (`latest`'s target first; an unreadable or dangling `latest` is
ignored), reporting the damaged ones it skipped (`find_checkpoint`). A model-only checkpoint
(`import hf`: `.metadata`, `*.distcp`, config.json, manifest.json) loads weights only. Pruning
(`keep_last`) counts the checkpoints up to the one just written, never deleting that one. A save
that fails (a full disk, an unwritable directory) raises `CheckpointWriteError` naming the file
and removes its temporary directory; the previous checkpoint is untouched.

One run saves into a save directory at a time (`claim_save_dir`): a second run given the same
`checkpoint.save` while the first trains is refused, naming the holder, since each would prune
the other's checkpoints and re-save over its steps. Holding the directory is also what lets a
start remove what a killed run's unfinished save left (a `.tmp-iter_N` without its manifest),
which otherwise stays when no later save reaches step N. The lock is an flock, released by
the kernel however the holder ends (kill -9 included); on a file system without locks the run
goes on unguarded, with a warning, and leaves such leftovers alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from nemotron.distributed.utils import all_ranks_true
from nemotron.models.nano3.config import BLOCK_SYMBOLS, Nano3Config
from nemotron.utils.fs import (
    LockBusy,
    atomic_write_bytes,
    atomic_write_text,
    exclusive_lock,
    free_space_note,
    remove_stale_temporaries,
)

CHECKPOINT_PATTERN = re.compile(r"^iter_(\d+)$")
LATEST_FILE = "latest"
TRAIN_STATE_FILE = "train_state.json"
CONFIG_FILE = "config.json"
RNG_DIR = "rng"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1  # manifest.json's "format": a reader refuses any other
TMP_PREFIX = ".tmp-"
PRUNED_PREFIX = f"{TMP_PREFIX}pruned-"  # a checkpoint being deleted (`_remove_checkpoint`)
SAVE_LOCK_FILE = ".lock"  # held by the one run saving into the directory (`claim_save_dir`)
# How long a starting run waits for the save directory's lock before it is refused: a requeued
# job can start while its predecessor's lock is still held (an NFSv4 server keeps a crashed
# client's locks until its lease expires, 90 s by default); a second run is refused after it.
SAVE_DIR_WAIT_S = 120.0


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns on every call made without a process group; single-process is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read or written."""


class CheckpointShapeError(CheckpointError):
    """A checkpoint whose model parameters do not match the model being loaded."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint whose files do not match its manifest (truncated, zeroed, missing)."""


class CheckpointWriteError(CheckpointError):
    """A save that could not be completed (full disk, unwritable directory); the previous
    checkpoint is untouched."""


def failure_reason(exc: BaseException) -> str:
    """One line for an error of a checkpoint read or write: the file (when known) and the cause.
    DCP reports failures as a `CheckpointException` (a BaseException) holding each rank's
    exception and traceback: the first rank's exception is what matters."""
    if isinstance(exc, CheckpointException):
        for rank, failure in sorted(exc.failures.items()):
            inner = failure[0] if isinstance(failure, tuple) else failure
            suffix = f" (rank {rank})" if _distributed() else ""
            return failure_reason(inner) + suffix
        return "DCP reported a failure without details"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {text}"


def saved_count(values: dict[str, Any], key: str, prefix: str = "") -> int:
    """`values[key]`, a counter of a train_state.json (a step, tokens, samples): a non-negative
    JSON integer below 2**63. Anything else (a string, 2.5, NaN, true, null, a negative number) is a
    ValueError naming `prefix + key`: such a value would otherwise fail far from the file, as
    an arithmetic TypeError or an index out of range, or be carried on silently."""
    value = values[key]
    if type(value) is not int or not 0 <= value < 2**63:  # counters index int64 arrays
        raise ValueError(f"{prefix}{key} must be a non-negative 64-bit integer, got {json.dumps(value)}")
    return value


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier(group=None) -> None:
    if _distributed():
        dist.barrier(group=group)


def _owner_rank(group) -> int:
    """The global rank of rank 0 of `group` (what broadcasts take as their source)."""
    return dist.get_global_rank(group, 0) if group is not None else 0


def _from_owner(value: Any, group=None) -> Any:
    """Rank 0's `value` on every rank of `group` (so that all ranks decide alike)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=_owner_rank(group), group=group)
    return box[0]


def _gathered(value: Any, group=None) -> list[Any]:
    """Every rank's `value`, on every rank of `group`."""
    if not _distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def _agreed(check: Callable[[], Any], group=None) -> Any:
    """`check()`'s value; if it raised a CheckpointError on any rank of `group`, every rank
    raises that rank's error (the first), so that none goes on to a collective alone."""
    value, problem = None, None
    try:
        value = check()
    except CheckpointError as e:
        problem = e
    raised = [e for e in _gathered(problem, group) if e is not None]
    if raised:
        raise raised[0]
    return value


def is_checkpoint_dir(path: Path) -> bool:
    """A directory that is (or claims to be) one checkpoint, complete or not."""
    path = Path(path)
    return path.is_dir() and any(
        (path / name).exists() for name in (MANIFEST_FILE, ".metadata", TRAIN_STATE_FILE)
    )


def _enclosing_checkpoint(path: Path) -> Path | None:
    """The checkpoint directory `path` is or lies inside, if any."""
    return next((d for d in (path, *path.parents) if is_checkpoint_dir(d)), None)


def save_dir_problem(save_dir: str | Path) -> str | None:
    """Why `save_dir` cannot be a save directory, or None: it is (or is inside) one checkpoint,
    whose manifest would not list the run's lock and checkpoints (the checkpoint read as
    damaged, by the run's own lock file)."""
    save = Path(save_dir).expanduser().resolve()
    directory = _enclosing_checkpoint(save)
    if directory is not None:
        what = "is the checkpoint" if directory == save else "is inside the checkpoint"
        return (
            f"checkpoint.save={save_dir} {what} {directory}, not a directory of checkpoints: "
            f"give the directory that holds them ({directory.parent}) or a new one"
        )
    return None


def job_dir_problem(job_dir: str | Path, save_dir: str | Path | None) -> str | None:
    """Why a run's job directory may not be at `job_dir`, or None: inside a checkpoint, its
    files are ones the manifest does not list (the checkpoint reads as damaged); under a name
    the checkpoints of `save_dir` take (`iter_N`, `.tmp-*`, `latest`, `.lock`), a save or a
    prune replaces or removes it with the job's config, logs and metrics. Elsewhere, the save
    dir itself and any other directory in it included, it is apart."""
    job = Path(job_dir).expanduser().resolve()
    directory = _enclosing_checkpoint(job)
    if directory is not None:
        return f"it is inside the checkpoint {directory}, whose manifest does not list its files"
    if save_dir is None:
        return None
    save = Path(save_dir).expanduser().resolve()
    if job == save or not job.is_relative_to(save):
        return None
    first = job.relative_to(save).parts[0]
    if (
        CHECKPOINT_PATTERN.match(first)
        or first.startswith(TMP_PREFIX)
        or first in (LATEST_FILE, SAVE_LOCK_FILE)
    ):
        return f"{save / first} is a name the checkpoints of checkpoint.save {save} take: a save replaces it"
    return None


def is_complete(path: Path) -> bool:
    """Finished saving: its manifest, written last, exists (whether the files still match it is
    `verify_checkpoint`'s question)."""
    path = Path(path)
    return not path.name.startswith(".") and (path / MANIFEST_FILE).is_file()


def _checkpoint_dirs(save_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `iter_*` directory of a save dir, complete or not, oldest first."""
    found = []
    if Path(save_dir).is_dir():
        for child in Path(save_dir).iterdir():
            match = CHECKPOINT_PATTERN.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
    return sorted(found)


def read_latest(save_dir: Path) -> str | None:
    """The checkpoint name `latest` points at; None when there is no `latest`, or it is
    unreadable or names no `iter_*` directory (a damaged or hand-edited pointer: resume then
    takes the newest checkpoint by step, as without one)."""
    try:
        name = (Path(save_dir) / LATEST_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if CHECKPOINT_PATTERN.match(name) else None


def complete_checkpoints(save_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in save_dir, oldest first."""
    return [(step, path) for step, path in _checkpoint_dirs(save_dir) if is_complete(path)]


def resolve_checkpoint(path: str | Path, must_exist: bool = True) -> Path | None:
    """A checkpoint directory itself, or the latest complete checkpoint of a save directory
    (not verified: see `find_checkpoint`).

    Returns None when `path` holds no checkpoint and `must_exist` is False.
    """
    path = Path(path)
    if is_complete(path):
        return path
    if is_checkpoint_dir(path):
        raise CheckpointError(f"{path} is an incomplete checkpoint (no {MANIFEST_FILE})")
    latest = read_latest(path)
    if latest is not None and is_complete(path / latest):
        return path / latest
    found = complete_checkpoints(path)
    if found:
        return found[-1][1]
    if must_exist:
        if not path.exists():
            raise CheckpointError(f"checkpoint path {path} does not exist")
        raise CheckpointError(f"{path} holds no complete checkpoint")
    return None


# ---------------------------------------------------------------------------------------------
# Manifest: sizes and checksums


def _checkpoint_files(directory: Path) -> list[str]:
    """Every file of a checkpoint directory but the manifest, relative, sorted."""
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE
    )


def _describe(path: Path, checksums: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"size": path.stat().st_size}
    if checksums:
        with open(path, "rb") as f:
            entry["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()
    return entry


def describe_files(directory: Path, checksums: bool = True, group=None) -> dict[str, dict]:
    """Size (and SHA-256) of every file of `directory`, read back from storage; each rank of
    `group` reads its share of the files, every rank returns the whole table (or raises
    `CheckpointError` if any rank could not read its share)."""
    names = _from_owner(_checkpoint_files(directory) if _group_rank(group) == 0 else None, group)
    world = dist.get_world_size(group) if _distributed() else 1
    mine: dict[str, dict] | str
    try:
        mine = {name: _describe(directory / name, checksums) for name in names[_group_rank(group) :: world]}
    except OSError as e:
        mine = failure_reason(e)
    parts = _gathered(mine, group)
    errors = [part for part in parts if isinstance(part, str)]
    if errors:
        raise CheckpointError(f"cannot read back {errors[0]}")
    return dict(sorted((name, entry) for part in parts for name, entry in part.items()))


def manifest_json(table: dict[str, dict], step: int | None) -> str:
    """The text of `manifest.json` for the files `describe_files` described (written last, with
    `atomic_write_text`: its presence marks the checkpoint complete)."""
    return json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": table}, indent=1)


def _check_file(path: Path, expected: dict[str, Any], checksums: bool) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as e:  # a symlink loop, a permission: the file cannot be checked
        return f"{path} cannot be read ({e.strerror or e})"
    if not path.is_file():  # a directory where the manifest lists a file
        return f"{path} is not a file"
    if size != expected.get("size"):
        return f"{path} has {size:,} bytes, its manifest says {expected.get('size'):,}"
    if checksums and "sha256" in expected:
        try:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            return f"{path} cannot be read ({e.strerror or e})"
        if digest != expected["sha256"]:
            return f"{path} does not match the SHA-256 in its manifest (its content changed)"
    return None


def verify_checkpoint(path: str | Path, checksums: bool = True, group=None) -> list[str]:
    """What is wrong with a checkpoint's files against its manifest (empty: intact). Each rank
    of `group` checks its share of the files; every rank returns the same list."""
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    files: Any = None
    problem = None
    if _group_rank(group) == 0:
        try:
            manifest = json.loads(manifest_file.read_text())
            if not isinstance(manifest, dict):
                raise ValueError("it is not a JSON object")
            fmt = manifest.get("format")
            if type(fmt) is not int or fmt != MANIFEST_FORMAT:  # true == 1 in Python
                raise ValueError(f"'format' is {json.dumps(fmt)}, not {MANIFEST_FORMAT}")
            files = manifest["files"]
            if not isinstance(files, dict):
                raise ValueError("'files' is not a table")
            named = CHECKPOINT_PATTERN.match(path.name)
            step = manifest.get("step")
            if named and type(step) is int and step != int(named.group(1)):
                # A checkpoint copied or renamed to another step's name: resumed, it restarted at
                # its own step and saved over the later checkpoints of the run.
                raise ValueError(f"it is of step {step}, but the directory is named {path.name}")
            for name, entry in files.items():
                if not isinstance(entry, dict) or type(entry.get("size")) is not int:
                    raise ValueError(f"the entry of {name!r} has no integer 'size'")
                digest = entry.get("sha256", "0" * 64)  # absent: written with sizes only
                if not (isinstance(digest, str) and _SHA256_HEX.fullmatch(digest)):
                    raise ValueError(f"the entry of {name!r} has a 'sha256' that is not one ({digest!r})")
            # Every file is listed at save: one that is not would be read unchecked (a
            # manifest cut short, or a file put there after the save).
            unlisted = sorted(set(_checkpoint_files(path)) - set(files))
            if unlisted:
                raise ValueError(f"it does not list {', '.join(unlisted)}, which the checkpoint holds")
        except FileNotFoundError:
            problem = (
                f"{manifest_file} is missing (the save did not finish, or the checkpoint predates manifests)"
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"{manifest_file} is unreadable ({failure_reason(e)})"
        except RecursionError:
            problem = f"{manifest_file} is unreadable (nested too deeply)"
    files, problem = _from_owner((files, problem), group)
    if problem is not None:
        return [problem]
    world = dist.get_world_size(group) if _distributed() else 1
    names = sorted(files)[_group_rank(group) :: world]
    mine = [p for p in (_check_file(path / n, files[n], checksums) for n in names) if p]
    return [p for part in _gathered(mine, group) for p in part]


@dataclass
class Skipped:
    """A checkpoint that resume passed over, and why."""

    path: Path
    problem: str


def find_checkpoint(
    path: str | Path, *, checksums: bool = True, must_exist: bool = True, group=None
) -> tuple[Path | None, list[Skipped]]:
    """The checkpoint to resume from, verified against its manifest, and the damaged ones
    passed over. `path` is a checkpoint (damaged: `CheckpointCorruptError` naming the file) or
    a save directory (its newest intact checkpoint, `latest`'s target first; none intact while
    some exist: `CheckpointCorruptError`, a run must not silently start over). None when `path`
    holds no checkpoint at all and `must_exist` is False."""
    path = Path(path)
    if is_checkpoint_dir(path):
        problems = verify_checkpoint(path, checksums, group)
        if problems:
            raise CheckpointCorruptError(f"checkpoint {path} is damaged: {problems[0]}")
        return path, []
    candidates = [p for _, p in reversed(_checkpoint_dirs(path))]
    latest = read_latest(path)
    candidates.sort(key=lambda p: p.name != latest)  # stable: latest first, then newest first
    candidates = _from_owner(candidates, group)
    skipped: list[Skipped] = []
    for candidate in candidates:
        problems = verify_checkpoint(candidate, checksums, group)
        if not problems:
            return candidate, skipped
        skipped.append(Skipped(candidate, problems[0]))
    if skipped:
        listing = "; ".join(f"{s.path.name}: {s.problem}" for s in skipped)
        raise CheckpointCorruptError(
            f"{path} holds no intact checkpoint ({listing}); move the damaged checkpoints "
            f"away to start over, or set checkpoint.load to one that is intact"
        )
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is not a directory (a checkpoint or a save dir is)")
    if must_exist:
        if path.is_symlink() and not path.exists():
            raise CheckpointError(f"checkpoint path {path} is a symlink to nothing (dangling, or a loop)")
        if not path.exists():
            raise CheckpointError(f"checkpoint path {path} does not exist")
        raise CheckpointError(f"{path} holds no checkpoint")
    return None, []


def check_writable(directory: str | Path, key: str = "checkpoint.save", group=None) -> None:
    """Fail now, not at the first save, when `directory` cannot be created or written."""
    directory = Path(directory)
    probe = directory / f".write-test-{os.getpid()}-{_rank()}"
    error = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        error = failure_reason(e)
    errors = [e for e in _gathered(error, group) if e]
    if errors:
        raise CheckpointWriteError(f"{key}={directory} is not writable: {errors[0]}")


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint that is no longer kept: renamed to a hidden name first, so that a
    removal cut short (a kill; a large checkpoint takes a while) leaves no `iter_N` that is
    half there: without its manifest it would never count as complete again, so no later
    prune would take it, and its space would stay taken. `finish_interrupted_saves` finishes
    such a removal."""
    doomed = path.with_name(f"{PRUNED_PREFIX}{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)  # an earlier removal of this step, cut short
    try:
        os.replace(path, doomed)
    except OSError:
        return  # (gone already, or not ours to move: left as it is, complete)
    shutil.rmtree(doomed, ignore_errors=True)


class SaveDirClaim:
    """A run's hold on its save directory (`claim_save_dir`); `release()` when the run ends.
    `locked`: whether this rank holds the lock (rank 0 of the group, on a file system that
    locks; elsewhere nothing is held, and on rank 0 the run is unguarded)."""

    def __init__(self, save_dir: Path, owner: bool, locked: bool, stack: contextlib.ExitStack) -> None:
        self.save_dir, self.owner, self.locked, self._stack = save_dir, owner, locked, stack

    def release(self) -> None:
        """Remove the lock file (while still holding it: a run starting now locks a new one)
        and let go. Idempotent."""
        stack, self._stack = self._stack, contextlib.ExitStack()
        with stack:
            if self.owner:
                with contextlib.suppress(OSError):
                    (self.save_dir / SAVE_LOCK_FILE).unlink()
                self.owner = self.locked = False


def claim_save_dir(
    save_dir: str | Path, job: str | Path | None = None, group=None, wait_s: float = 0.0
) -> SaveDirClaim:
    """Hold `save_dir` for this run (rank 0 of `group` locks, every rank gets the outcome):
    another run holding it for `wait_s` seconds more is a `CheckpointError` naming that run
    (pid, host, start, job), on every rank. Call on every rank of `group` after
    `check_writable`."""
    save_dir = Path(save_dir)
    stack = contextlib.ExitStack()

    def claim() -> bool:
        if _group_rank(group) != 0:
            return True
        holder = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                "job": str(Path(job).absolute()) if job is not None else None,
            }
        )
        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    return stack.enter_context(exclusive_lock(save_dir / SAVE_LOCK_FILE, holder))
                except LockBusy as busy:
                    if time.monotonic() >= deadline:
                        raise CheckpointError(_busy_message(save_dir, busy, wait_s)) from None
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        except OSError as e:
            raise CheckpointWriteError(
                f"checkpoint.save={save_dir}: cannot lock {failure_reason(e)}"
            ) from None

    try:
        locked = _agreed(claim, group)
    except BaseException:
        stack.close()
        raise
    owner = _group_rank(group) == 0
    return SaveDirClaim(save_dir, owner, bool(locked) and owner, stack)


def _busy_message(save_dir: Path, busy: LockBusy, wait_s: float) -> str:
    try:
        other = json.loads(busy.holder)
        who = f"pid {other['pid']} on {other['host']}, started {other['started']}"
        if other.get("job"):
            who += f", job {other['job']}"
    except (ValueError, TypeError, KeyError):
        who = f"which has not said who it is yet ({busy.path})"
    waited = f", still after {wait_s:g} s" if wait_s > 0 else ""
    return (
        f"checkpoint.save={save_dir} is in use by another training run ({who}){waited}: two runs saving "
        f"into one directory would prune and overwrite each other's checkpoints; wait for it "
        f"to end or stop it, or give this run another checkpoint.save"
    )


def finish_interrupted_saves(save_dir: str | Path, group=None, claimed: bool = False) -> list[str]:
    """Finish the publication a run killed at the end of a save left undone; returns the names
    of the checkpoints it made visible (for the run's warnings). Call before resuming from
    `save_dir`, on every rank of `group` (the owner rank moves, the others wait).

    `Checkpointer` publishes a save in three moves after its manifest (written last, so a
    `.tmp-iter_N` holding one is complete on every rank): `latest` rewritten to name `iter_N`,
    a checkpoint of the same step moved aside to `.tmp-old-iter_N` (re-saving a step), the new
    one renamed to `iter_N`. Killed between them (or after the manifest, before the first
    move), the complete new checkpoint would stay hidden and the next
    save of that step would delete it, so resume would start from an older one: here it is
    renamed into place, `latest` names it, and the set-aside copy goes. A removal of a
    checkpoint no longer kept (`keep_last`) that a kill cut short is finished too.

    `claimed`: this run holds the directory (`claim_save_dir`), so no other process is saving
    there: a `.tmp-iter_N` without a manifest is an unfinished save of a run that is gone, and
    is removed (else it stays until a save of step N, which may never come)."""
    save_dir = Path(save_dir)
    finished: list[str] = []
    if _group_rank(group) == 0 and save_dir.is_dir():
        remove_stale_temporaries(save_dir, LATEST_FILE)  # a rewrite of `latest` killed mid-way
        complete = [
            tmp
            for tmp in sorted(save_dir.glob(f"{TMP_PREFIX}iter_*"))
            if CHECKPOINT_PATTERN.match(tmp.name[len(TMP_PREFIX) :]) and (tmp / MANIFEST_FILE).is_file()
        ]
        if complete:  # `latest` first, as a save does: a kill during the moves leaves them to the next start
            atomic_write_text(save_dir / LATEST_FILE, complete[-1].name[len(TMP_PREFIX) :] + "\n")
        for tmp in complete:
            final = save_dir / tmp.name[len(TMP_PREFIX) :]
            if final.exists():
                # Killed before the old copy was moved aside: the save (`prepare` clears a
                # `.tmp-` of the step first) is newer than the `iter_N` it re-saves.
                old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
                shutil.rmtree(old, ignore_errors=True)  # older still (a removal that failed)
                os.replace(final, old)
            os.replace(tmp, final)
            finished.append(final.name)
        for old in save_dir.glob(f"{TMP_PREFIX}old-iter_*"):
            final = save_dir / old.name[len(f"{TMP_PREFIX}old-") :]
            if final.exists():  # replaced: only the removal of the old copy was cut short
                shutil.rmtree(old, ignore_errors=True)
            else:  # not replaced (the new copy was incomplete): the old one is still the step's
                os.replace(old, final)
        for doomed in save_dir.glob(f"{PRUNED_PREFIX}iter_*"):
            shutil.rmtree(doomed, ignore_errors=True)
        if claimed:
            for tmp in save_dir.glob(f"{TMP_PREFIX}iter_*"):
                if CHECKPOINT_PATTERN.match(tmp.name[len(TMP_PREFIX) :]) and tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)  # (the complete ones were moved above)
    return _from_owner(finished, group)  # (a broadcast: the other ranks wait for the moves)


# ---------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _load_rng_state(path: Path) -> dict[str, Any]:
    """An RNG file, unpickled with torch's weights-only unpickler widened to numpy's state
    arrays only: a hostile file (its manifest rewritten to match) is an error, never code run."""
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1
    reconstruct = core.multiarray._reconstruct
    allowed: list[Any] = [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    # a file pickled under the other numpy major names the function by its other module
    allowed += [(reconstruct, f"numpy.{m}.multiarray._reconstruct") for m in ("core", "_core")]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, weights_only=True)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Model / optimiser state


# Checkpoints before 2026-12-08 keyed the optimizer's group settings by group index
# ("optimizer.param_groups.0.lr"); since, by each parameter's name (`_FLAT_OPTIMIZER`).
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_INDEXED_GROUP_KEY = re.compile(r"^optimizer\.param_groups\.\d+\.")


def _optimizer_options(flat: bool) -> StateDictOptions:
    """The optimizer state's form: `flat` keys each parameter's group settings by its name
    ("param_groups.<fqn>.lr"), so that pipeline ranks, each holding other parameters, write
    entries of their own. Keyed by group index, every stage wrote "param_groups.0.*" with its
    own parameters, DCP kept one stage's, and the other stages' groups came back without their
    settings: a pipeline checkpoint could not be resumed by a pipeline run."""
    return StateDictOptions(flatten_optimizer_state_dict=flat)


def training_state_dict(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, flat_optimizer: bool = True
) -> dict:
    """FQN-keyed model and optimiser state (DTensor-aware, so it reshards on load), as plain
    tensors sharing the parameters' storage (the routed experts' FSDP2 FP8-gather wrappers,
    `train.fp8.experts_fsdp_float8_all_gather`, unwrapped: checkpoints are the same with and
    without it). `flat_optimizer`: the form every save writes (`_optimizer_options`); False
    reads a checkpoint of the earlier, group-indexed form."""
    from nemotron.train.fp8_gather import plain_tensors

    if optimizer is None:
        model_sd, _ = get_state_dict(model, optimizers=[])
        return {"model": plain_tensors(model_sd)}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_optimizer_options(flat_optimizer))
    return {"model": plain_tensors(model_sd), "optimizer": plain_tensors(optim_sd)}


def saved_metadata(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's DCP entries (key -> tensor or bytes metadata), read from `.metadata`."""
    try:
        return dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    except Exception as e:  # a damaged .metadata of a checkpoint without manifest
        raise CheckpointCorruptError(f"cannot read {checkpoint / '.metadata'}: {failure_reason(e)}") from None


def _optimizer_state_params(keys, prefix: str) -> set[str]:
    """The parameter names the optimizer-state keys under `prefix` ("state.<fqn>.<name>") hold."""
    return {key[len(prefix) :].rsplit(".", 1)[0] for key in keys if key.startswith(prefix)}


def _check_optimizer_params(
    checkpoint: Path, metadata: dict[str, Any], ours: set[str], every_rank: set[str]
) -> None:
    """Raise CheckpointShapeError when the checkpoint holds optimizer state for parameters no
    rank's optimizer has, or lacks state for one of this rank's (`every_rank`: the names of all
    ranks' parts under pipeline parallelism). An untied checkpoint loaded into a model with tied
    embeddings has state for `lm_head.weight`, whose parameter is the embeddings': keyed by
    name, it would load without a word (both tensors into one)."""
    saved = _optimizer_state_params(metadata, "optimizer.state.")
    missing, unexpected = sorted(ours - saved), sorted(saved - every_rank)
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        parts.append(f"no optimizer state for {', '.join(missing[:12])}")
    if unexpected:
        parts.append(f"optimizer state for parameters this model does not have: {', '.join(unexpected[:12])}")
    raise CheckpointShapeError(
        f"checkpoint {checkpoint} does not fit this model and optimizer: {'; '.join(parts)}"
    )


def check_model_shapes(
    checkpoint: Path,
    model_state: dict[str, Any],
    part: bool = False,
    all_parts: set[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Raise CheckpointShapeError naming every parameter that is missing, extra or reshaped.
    `part`: the model is one pipeline rank's part, so the checkpoint's other entries belong to
    other stages; `all_parts`: the names of every rank's part, so that an entry no stage holds
    is still named (None: not known, not checked). `metadata`: `saved_metadata(checkpoint)`,
    when the caller has read it."""
    if metadata is None:
        metadata = saved_metadata(checkpoint)
    saved = {
        key[len("model.") :]: tuple(value.size)
        for key, value in metadata.items()
        if key.startswith("model.") and hasattr(value, "size")
    }
    ours = {key: tuple(value.shape) for key, value in model_state.items() if torch.is_tensor(value)}
    missing = sorted(set(ours) - set(saved))
    held = set(ours) if not part else all_parts if all_parts is not None else set(saved)
    unexpected = sorted(set(saved) - held)
    reshaped = sorted(k for k in set(ours) & set(saved) if ours[k] != saved[k])
    if not (missing or unexpected or reshaped):
        return

    def listing(names: list[str], fmt: Callable[[str], str] = str) -> str:
        shown = ", ".join(fmt(n) for n in names[:12])
        return shown + (f", ... ({len(names)} in all)" if len(names) > 12 else "")

    problems = []
    if reshaped:
        problems.append(
            "shape mismatch: "
            + listing(reshaped, lambda k: f"{k} (checkpoint {list(saved[k])}, model {list(ours[k])})")
        )
    if missing:
        problems.append("missing from checkpoint: " + listing(missing))
    if unexpected:
        problems.append("not in model: " + listing(unexpected))
    raise CheckpointShapeError(f"checkpoint {checkpoint} does not fit this model; " + "; ".join(problems))


# What each architecture key of the `model` section (`Nano3Config`) means to a checkpoint's
# weights. Keys of a block kind matter only where the pattern has such blocks (Nano3 has no
# dense MLP, so its `ffn_hidden_size` is free). Unlisted keys decide the weights' shapes or
# meaning: a change of one is refused on load (a head-count change may keep every shape: the
# weights would load and mean something else).
BLOCK_KEYS: dict[str, tuple[str, ...]] = {
    "attention": ("num_attention_heads", "num_key_value_heads", "head_dim"),
    "mamba": (
        "mamba_num_heads",
        "mamba_head_dim",
        "mamba_state_size",
        "mamba_num_groups",
        "mamba_conv_kernel",
        "mamba_chunk_size",
        "mamba_dt_min",
        "mamba_dt_max",
        "mamba_dt_init_floor",
    ),
    "moe": (
        "num_experts",
        "moe_ffn_hidden_size",
        "moe_shared_expert_hidden_size",
        "moe_top_k",
        "moe_routed_scaling_factor",
        "moe_seq_aux_loss_coeff",
    ),
    "mlp": ("ffn_hidden_size",),
}
assert set(BLOCK_KEYS) == set(BLOCK_SYMBOLS.values())  # every block kind the pattern parser knows
# Free to change: the initialisation (a loaded model is not initialised), the balance loss's
# coefficient (a training setting) and the SSD chunk size (how the scan is computed, not what).
FREE_KEYS = frozenset(
    {
        "init_std",
        "mamba_dt_min",
        "mamba_dt_max",
        "mamba_dt_init_floor",
        "moe_seq_aux_loss_coeff",
        "mamba_chunk_size",
    }
)
# The weights fit, the model computes something else: deliberate changes of the forward pass
# (Megatron lets a run resume with another top-k), so they are announced, not refused.
FORWARD_KEYS = frozenset({"norm_eps", "moe_top_k", "moe_routed_scaling_factor"})


def saved_config(checkpoint: Path) -> dict[str, Any] | None:
    """The run config a checkpoint was saved with (its config.json); None when it has none (a
    checkpoint from before run configs were saved). One that is there but unreadable, not
    JSON or not an object is damage (CheckpointCorruptError naming it): with
    `verify_checksums=false` only its size was checked, and reading it as absent would skip
    the architecture and data-order checks silently."""
    path = Path(checkpoint) / CONFIG_FILE
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        saved = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointCorruptError(f"cannot read {path}: {failure_reason(e)}") from None
    if not isinstance(saved, dict):
        raise CheckpointCorruptError(f"{path} is not a JSON object (a run config)")
    return saved


def saved_architecture(checkpoint: Path) -> dict[str, Any] | None:
    """The `model` section of the checkpoint's config.json (what it was trained with); None
    when it has none (config.json is checked against the manifest before this is read)."""
    saved = saved_config(checkpoint)
    section = saved.get("model") if saved is not None else None
    if section is not None and not isinstance(section, dict):
        raise CheckpointCorruptError(f"{Path(checkpoint) / CONFIG_FILE}: 'model' is not an object")
    return section


def check_architecture(checkpoint: Path, config: Nano3Config) -> list[str]:
    """Compare the architecture the checkpoint was trained with (its config.json) with
    `config`: raise CheckpointShapeError naming every changed key that decides the weights'
    shapes or meaning, with both values; return one line per changed forward-only key
    (`FORWARD_KEYS`) for the run to warn about."""
    saved = saved_architecture(checkpoint)
    if saved is None:
        return []
    ours = dataclasses.asdict(config)
    kinds = set(config.block_kinds)
    unused = {key for kind, keys in BLOCK_KEYS.items() if kind not in kinds for key in keys}
    if saved.get("hybrid_pattern") != config.hybrid_pattern:
        unused = set()  # the blocks themselves changed: every difference is reported
    changed = [
        key
        for key in ours
        if key in saved and saved[key] != ours[key] and key not in FREE_KEYS and key not in unused
    ]

    def describe(key: str) -> str:
        return f"model.{key} {saved[key]!r} in the checkpoint, {ours[key]!r} in this run"

    refused = [key for key in changed if key not in FORWARD_KEYS]
    if refused:
        raise CheckpointShapeError(
            f"checkpoint {checkpoint} was trained with another model ({checkpoint / CONFIG_FILE}): "
            + "; ".join(describe(key) for key in refused)
            + ": its weights do not fit this one; load it with the model it was trained with"
        )
    return [
        f"{describe(key)}: the checkpoint's weights are loaded into a model that computes differently"
        for key in changed
    ]


@dataclass
class LoadedCheckpoint:
    path: Path
    train_state: dict[str, Any]
    skipped: list[Skipped] = field(default_factory=list)  # damaged checkpoints passed over
    # forward-only architecture keys that differ from the checkpoint's (`check_architecture`)
    model_changes: list[str] = field(default_factory=list)


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
    group=None,
    checksums: bool = True,
    must_exist: bool = True,
    model_config: Nano3Config | None = None,
) -> LoadedCheckpoint | None:
    """Load `path` (a checkpoint, or a save dir: its newest intact one, `find_checkpoint`) into
    model/optimizer, after checking its files against its manifest and, given the run's
    `model_config`, the architecture the checkpoint was trained with against it
    (`check_architecture`). None only when `path` holds no checkpoint and `must_exist` is False."""
    checkpoint, skipped = find_checkpoint(path, checksums=checksums, must_exist=must_exist, group=group)
    if checkpoint is None:
        return None
    train_state_file = checkpoint / TRAIN_STATE_FILE
    if optimizer is not None and not train_state_file.is_file():
        raise CheckpointError(
            f"{checkpoint} is a model-only checkpoint (no {TRAIN_STATE_FILE}, no optimizer state, "
            f"e.g. written by `import hf`): it cannot be resumed; set checkpoint.finetune=true to "
            f"start a run from its weights"
        )
    model_changes = _agreed(
        lambda: check_architecture(checkpoint, model_config) if model_config else [], group
    )
    metadata = _agreed(lambda: saved_metadata(checkpoint), group)
    # An earlier checkpoint's optimizer groups are keyed by index: read in that form.
    flat = optimizer is None or not any(_INDEXED_GROUP_KEY.match(key) for key in metadata)
    state = training_state_dict(model, optimizer, flat_optimizer=flat)
    part = getattr(model, "is_pipeline_part", False)
    # A pipeline rank sees its own stages' entries only: the checkpoint's entries are checked
    # against every rank's, and a rank missing some stops every rank (not only itself, while
    # the others wait in DCP's collective load).
    names = [k for k, v in state["model"].items() if torch.is_tensor(v)]
    all_parts = set().union(*_gathered(names, group)) if part and _distributed() else None
    _agreed(lambda: check_model_shapes(checkpoint, state["model"], part, all_parts, metadata), group)
    if optimizer is not None:
        optim = state["optimizer"]
        ours = _optimizer_state_params(optim, "state.") if flat else set(optim.get("state", {}))
        all_ours = set().union(*_gathered(sorted(ours), group)) if part and _distributed() else ours
        _agreed(lambda: _check_optimizer_params(checkpoint, metadata, ours, all_ours), group)
    try:
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=str(checkpoint), process_group=group)
    except (Exception, CheckpointException) as e:  # DCP's own is a BaseException
        raise CheckpointCorruptError(f"cannot read checkpoint {checkpoint}: {failure_reason(e)}") from None
    try:
        set_state_dict(
            model,
            optimizer if optimizer is not None else [],
            model_state_dict=state["model"],
            optim_state_dict=state.get("optimizer", {}),
            options=_optimizer_options(flat),
        )
    except (RuntimeError, KeyError, ValueError) as e:  # e.g. no optimizer state for a parameter
        raise CheckpointShapeError(
            f"checkpoint {checkpoint} does not fit this model and optimizer: {failure_reason(e)}"
        ) from None
    train_state: dict[str, Any] = {}
    if train_state_file.is_file():  # absent only from a model-only checkpoint (weights only)
        try:
            train_state = json.loads(train_state_file.read_text())
        except (OSError, ValueError) as e:  # ValueError: not UTF-8, not JSON, a 4,300+ digit number
            raise CheckpointError(f"{train_state_file} is unreadable: {failure_reason(e)}") from None
        except RecursionError:
            raise CheckpointError(f"{train_state_file} is unreadable: nested too deeply") from None
        if not isinstance(train_state, dict):
            raise CheckpointError(f"{train_state_file} is not a JSON object")
    rng_file = checkpoint / RNG_DIR / f"rank_{_rank():05d}.pt"
    if restore_rng and rng_file.is_file():
        try:
            rng = _load_rng_state(rng_file)
            set_rng_state(rng)
        except Exception as e:  # unreadable, or not an RNG state ({'python': 1}: a TypeError)
            raise CheckpointCorruptError(f"cannot read {rng_file}: {failure_reason(e)}") from None
    return LoadedCheckpoint(checkpoint, train_state, skipped, model_changes)


# ---------------------------------------------------------------------------------------------
# Saving


@dataclass
class _PendingSave:
    future: Future
    tmp: Path
    final: Path
    step: int


def _group_rank(group) -> int:
    return dist.get_rank(group) if _distributed() else 0


class Checkpointer:
    """Writes checkpoints into one save directory; at most one async save in flight.

    Every rank of `group` (default: all ranks) calls `save`, `poll` and `wait` at the same
    points. Rank 0 of the group owns the directory moves (stale-tmp cleanup, tmp -> final
    rename, `latest`, pruning); the other ranks only write their shards and RNG state, inside
    barriers, so no rank touches the temporary directory while another removes or renames
    it, and every rank returns from a save only once the checkpoint is complete and visible.
    Async saves write through a gloo process group of their own: the background thread's
    collectives must not interleave with the training loop's collectives on the same group.
    """

    def __init__(
        self,
        save_dir: str | Path,
        keep_last: int | None = None,
        async_save: bool = False,
        group=None,
        on_complete: Callable[[Path, int], None] | None = None,
        checksums: bool = True,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.checksums = checksums  # SHA-256 of every file in the manifest (else sizes only)
        self.keep_last = keep_last
        self.async_save = async_save
        self.group = group
        self.on_complete = on_complete
        self._pending: _PendingSave | None = None
        self._async_group = None
        if async_save and _distributed():  # collective: every rank constructs its Checkpointer
            ranks = dist.get_process_group_ranks(group) if group is not None else None
            self._async_group = dist.new_group(ranks=ranks, backend="gloo")

    @property
    def in_flight(self) -> bool:
        return self._pending is not None

    @property
    def _owner(self) -> bool:
        return _group_rank(self.group) == 0

    def _check_same_path(self, path: Path) -> None:
        """Ranks that disagree on the directory (e.g. a relative path under different working
        directories) would each write a partial checkpoint: refuse up front."""
        if not _distributed():
            return
        paths: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(paths, str(path.absolute()), group=self.group)
        if len(set(paths)) > 1:
            listing = ", ".join(f"rank {r}: {p}" for r, p in enumerate(paths))
            raise CheckpointError(
                f"ranks disagree on the checkpoint directory ({listing}); "
                f"give checkpoint.save as one absolute path on shared storage"
            )

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        train_state: dict[str, Any],
        files: dict[str, str] | None = None,
    ) -> Path:
        """Checkpoint at `step`; returns its final path (complete once `wait` returns, if async).
        A failed write raises `CheckpointWriteError` on every rank and leaves no trace."""
        self.wait()
        name = checkpoint_name(step)
        final = self.save_dir / name
        tmp = self.save_dir / f"{TMP_PREFIX}{name}"
        self._check_same_path(tmp)

        def prepare() -> None:
            if tmp.exists():  # left by a run killed mid-save
                shutil.rmtree(tmp)
            (tmp / RNG_DIR).mkdir(parents=True)

        self._together(tmp, prepare, owner_only=True)  # the directory exists, nobody removes it
        self._together(tmp, lambda: torch.save(rng_state(), tmp / RNG_DIR / f"rank_{_rank():05d}.pt"))

        def write_files() -> None:
            (tmp / TRAIN_STATE_FILE).write_text(json.dumps(train_state, indent=2, sort_keys=True))
            for file_name, text in (files or {}).items():
                (tmp / file_name).write_text(text)

        self._together(tmp, write_files, owner_only=True)
        state = training_state_dict(model, optimizer)
        try:
            with _quiet_dcp():
                if self.async_save:
                    # Stages a copy of the state synchronously, writes it in a background thread.
                    group = self._async_group if self._async_group is not None else self.group
                    future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=group)
                else:
                    dcp.save(state, checkpoint_id=str(tmp), process_group=self.group)
        except (Exception, CheckpointException) as e:  # DCP's own is a BaseException
            self._fail(tmp, failure_reason(e))
        if self.async_save:
            # an AsyncSaveResponse comes only with an `async_stager`, which is not passed
            assert isinstance(future, Future)
            self._pending = _PendingSave(future, tmp, final, step)
        else:
            self._finalize(tmp, final, step)
        return final

    def poll(self) -> None:
        """Finish an async save once its writes are done on every rank (call once per step on
        every rank: ranks must agree, or one would finalize while another trains on)."""
        if self._pending is not None and all_ranks_true(self._pending.future.done(), self.group):
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is complete and visible."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.future.result()
        except (Exception, CheckpointException) as e:  # DCP's own is a BaseException
            self._fail(pending.tmp, failure_reason(e))
        self._finalize(pending.tmp, pending.final, pending.step)

    def _together(self, tmp: Path, write: Callable[[], None], owner_only: bool = False) -> None:
        """Run one write on every rank (or the owner only); if it failed anywhere, every rank
        raises, so that none goes on to a collective the others never reach."""
        error = None
        if self._owner or not owner_only:
            try:
                write()
            except (OSError, RuntimeError) as e:  # torch.save's zip writer: RuntimeError
                error = failure_reason(e)
        errors = [e for e in _gathered(error, self.group) if e]
        if errors:
            self._fail(tmp, errors[0])

    def _fail(self, tmp: Path, reason: str) -> None:
        """Remove the unfinished save (its space may be what is missing) and raise. The free
        space is part of the message: a full disk does not always surface as ENOSPC (torch's
        zip writer reports a short write as "unexpected pos")."""
        if self._owner:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(
            f"checkpoint {tmp.name[len(TMP_PREFIX) :]} could not be written to {tmp.parent}: "
            f"{reason}{free_space_note(tmp.parent)}"
        )

    def _finalize(self, tmp: Path, final: Path, step: int) -> None:
        # DCP returns on every rank only after the coordinator wrote .metadata, so all shards
        # are in `tmp` here; the manifest is read back from storage (every rank its share).
        try:
            table = describe_files(tmp, self.checksums, self.group)
        except CheckpointError as e:
            self._fail(tmp, str(e))
        manifest = manifest_json(table, step)

        def publish() -> None:
            atomic_write_text(tmp / MANIFEST_FILE, manifest)  # last: marks the save complete
            # `latest` names the checkpoint before its rename, not after: killed between the
            # two, the next start finishes the move (`finish_interrupted_saves`) and `latest`
            # is right. Written after, a kill between left the complete new `iter_N` with
            # `latest` naming the previous checkpoint, which resume takes first: the steps
            # since were trained again, and the newer checkpoint overwritten.
            latest = self.save_dir / LATEST_FILE
            try:
                before: bytes | None = latest.read_bytes()
            except OSError:  # none (or unreadable: as if none, `read_latest`)
                before = None
            atomic_write_text(latest, final.name + "\n")
            try:
                if final.exists():  # re-saving a step (e.g. after resuming at it): replace it
                    old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
                    if old.exists():
                        shutil.rmtree(old)
                    os.replace(final, old)
                    os.replace(tmp, final)
                    # The new checkpoint is in place: a copy that will not go (yet) is removed
                    # by the next start.
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, final)
            except OSError:  # (the save fails and is removed: `latest` names what it named)
                if before is None:
                    latest.unlink(missing_ok=True)
                else:
                    atomic_write_bytes(latest, before)
                raise

        self._together(tmp, publish, owner_only=True)
        if self._owner:
            self._prune(step)
            if self.on_complete is not None:
                self.on_complete(final, step)
        _barrier(self.group)

    def _prune(self, step: int) -> None:
        """Delete all but the newest `keep_last` complete checkpoints up to `step` (the one just
        written, which is always kept). Checkpoints of later steps are left alone: they are an
        earlier run's, which this one resumed from before them (`checkpoint.load` of an older
        checkpoint, or a damaged newest one skipped), and counting them would delete the
        checkpoint just written."""
        if not self.keep_last:
            return
        found = [(s, path) for s, path in complete_checkpoints(self.save_dir) if s <= step]
        for _, path in found[: max(0, len(found) - self.keep_last)]:
            _remove_checkpoint(path)
