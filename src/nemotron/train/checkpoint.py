"""Checkpoints with torch.distributed.checkpoint (DCP): save, find, load, keep-last, async.

Layout of a save directory:

    SAVE/iter_0000100/          one complete checkpoint
        .metadata, *.distcp       DCP: "model" (incl. expert biases) and "optimizer" state,
                                  resharded on load, so a checkpoint saved with one parallel
                                  layout loads into another
        train_state.json          step, tokens, loader position (consumed samples per split),
                                  blend phase, fault counters
        rng/rank_00000.pt         python, numpy, torch (and CUDA) RNG states of each rank
        config.json               the run's config (export rebuilds the model from it)
        ModelArtifact-pretrain.json   lineage manifest (artifacts/model.py)
    SAVE/latest                 name of the newest complete checkpoint
    SAVE/.tmp-iter_0000200/     a save in progress: never looked at by resume

A checkpoint is written under `.tmp-<name>`, renamed to `<name>` once every file is written,
and only then does `latest` (itself written to a temporary name and renamed) point at it.
A process killed at any moment leaves the previous checkpoint and `latest` intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from nemotron.utils.fs import atomic_write_text

CHECKPOINT_PATTERN = re.compile(r"^iter_(\d+)$")
LATEST_FILE = "latest"
TRAIN_STATE_FILE = "train_state.json"
CONFIG_FILE = "config.json"
RNG_DIR = "rng"
TMP_PREFIX = ".tmp-"



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


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier(group=None) -> None:
    if _distributed():
        dist.barrier(group=group)


def is_complete(path: Path) -> bool:
    path = Path(path)
    return (
        not path.name.startswith(".")
        and (path / ".metadata").is_file()
        and (path / TRAIN_STATE_FILE).is_file()
    )


def complete_checkpoints(save_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in save_dir, oldest first."""
    found = []
    if Path(save_dir).is_dir():
        for child in Path(save_dir).iterdir():
            match = CHECKPOINT_PATTERN.match(child.name)
            if match and is_complete(child):
                found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_checkpoint(path: str | Path, must_exist: bool = True) -> Path | None:
    """A checkpoint directory itself, or the latest complete checkpoint of a save directory.

    Returns None when `path` holds no checkpoint and `must_exist` is False.
    """
    path = Path(path)
    if is_complete(path):
        return path
    if path.is_dir() and (path / ".metadata").exists():
        raise CheckpointError(f"{path} is an incomplete checkpoint (no {TRAIN_STATE_FILE})")
    marker = path / LATEST_FILE
    if marker.is_file():
        target = path / marker.read_text().strip()
        if is_complete(target):
            return target
    found = complete_checkpoints(path)
    if found:
        return found[-1][1]
    if must_exist:
        if not path.exists():
            raise CheckpointError(f"checkpoint path {path} does not exist")
        raise CheckpointError(f"{path} holds no complete checkpoint")
    return None


# ---------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Model / optimiser state


def training_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """FQN-keyed model and optimiser state (DTensor-aware, so it reshards on load)."""
    if optimizer is None:
        model_sd, _ = get_state_dict(model, optimizers=[])
        return {"model": model_sd}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def check_model_shapes(checkpoint: Path, model_state: dict[str, Any]) -> None:
    """Raise CheckpointShapeError naming every parameter that is missing, extra or reshaped."""
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    saved = {
        key[len("model."):]: tuple(value.size)
        for key, value in metadata.items()
        if key.startswith("model.") and hasattr(value, "size")
    }
    ours = {key: tuple(value.shape) for key, value in model_state.items() if torch.is_tensor(value)}
    missing = sorted(set(ours) - set(saved))
    unexpected = sorted(set(saved) - set(ours))
    reshaped = sorted(k for k in set(ours) & set(saved) if ours[k] != saved[k])
    if not (missing or unexpected or reshaped):
        return

    def listing(names: list[str], fmt: Callable[[str], str] = str) -> str:
        shown = ", ".join(fmt(n) for n in names[:12])
        return shown + (f", ... ({len(names)} in all)" if len(names) > 12 else "")

    problems = []
    if reshaped:
        problems.append("shape mismatch: " + listing(
            reshaped, lambda k: f"{k} (checkpoint {list(saved[k])}, model {list(ours[k])})"))
    if missing:
        problems.append("missing from checkpoint: " + listing(missing))
    if unexpected:
        problems.append("not in model: " + listing(unexpected))
    raise CheckpointShapeError(
        f"checkpoint {checkpoint} does not fit this model; " + "; ".join(problems)
    )


@dataclass
class LoadedCheckpoint:
    path: Path
    train_state: dict[str, Any]


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    restore_rng: bool = True,
    group=None,
) -> LoadedCheckpoint:
    """Load `path` (a checkpoint, or a save dir: its latest complete one) into model/optimizer."""
    checkpoint = resolve_checkpoint(path)
    state = training_state_dict(model, optimizer)
    check_model_shapes(checkpoint, state["model"])
    try:
        with _quiet_dcp():
            dcp.load(state, checkpoint_id=str(checkpoint), process_group=group)
    except Exception as e:  # DCP raises assorted errors for corrupt or foreign files
        raise CheckpointError(f"cannot read checkpoint {checkpoint}: {e}") from e
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=state["model"],
        optim_state_dict=state.get("optimizer", {}),
    )
    try:
        train_state = json.loads((checkpoint / TRAIN_STATE_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{checkpoint / TRAIN_STATE_FILE} is not valid JSON: {e}") from None
    rng_file = checkpoint / RNG_DIR / f"rank_{_rank():05d}.pt"
    if restore_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return LoadedCheckpoint(checkpoint, train_state)


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


def _flag_device(group) -> torch.device:
    """Where a small control tensor must live for a collective on `group` (CUDA under NCCL)."""
    backend = dist.get_backend(group)
    if "gloo" in backend or "cpu" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _all_ranks_true(value: bool, group) -> bool:
    if not _distributed():
        return value
    flag = torch.tensor([1 if value else 0], device=_flag_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


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
    ) -> None:
        self.save_dir = Path(save_dir)
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
            raise CheckpointError(f"ranks disagree on the checkpoint directory ({listing}); "
                                  f"give checkpoint.save as one absolute path on shared storage")

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        train_state: dict[str, Any],
        files: dict[str, str] | None = None,
    ) -> Path:
        """Checkpoint at `step`; returns its final path (complete once `wait` returns, if async)."""
        self.wait()
        name = checkpoint_name(step)
        final = self.save_dir / name
        tmp = self.save_dir / f"{TMP_PREFIX}{name}"
        self._check_same_path(tmp)
        if self._owner:
            if tmp.exists():  # left by a run killed mid-save
                shutil.rmtree(tmp)
            (tmp / RNG_DIR).mkdir(parents=True)
        _barrier(self.group)  # the directory exists, and nobody removes it any more
        torch.save(rng_state(), tmp / RNG_DIR / f"rank_{_rank():05d}.pt")
        if self._owner:
            (tmp / TRAIN_STATE_FILE).write_text(json.dumps(train_state, indent=2, sort_keys=True))
            for file_name, text in (files or {}).items():
                (tmp / file_name).write_text(text)
        state = training_state_dict(model, optimizer)
        if self.async_save:
            # Stages a copy of the state synchronously, writes it in a background thread.
            group = self._async_group if self._async_group is not None else self.group
            with _quiet_dcp():
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=group)
            self._pending = _PendingSave(future, tmp, final, step)
        else:
            with _quiet_dcp():
                dcp.save(state, checkpoint_id=str(tmp), process_group=self.group)
            self._finalize(tmp, final, step)
        return final

    def poll(self) -> None:
        """Finish an async save once its writes are done on every rank (call once per step on
        every rank: ranks must agree, or one would finalize while another trains on)."""
        if self._pending is not None and _all_ranks_true(self._pending.future.done(), self.group):
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is complete and visible."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.future.result()
        except Exception as e:
            raise CheckpointError(f"async checkpoint save to {pending.tmp} failed: {e}") from e
        self._finalize(pending.tmp, pending.final, pending.step)

    def _finalize(self, tmp: Path, final: Path, step: int) -> None:
        # DCP returns on every rank only after the coordinator wrote .metadata, so all shards
        # are in `tmp` here; the barrier below keeps other ranks from racing ahead of the rename.
        if self._owner:
            if final.exists():  # re-saving a step (e.g. after resuming at it): replace it
                old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            atomic_write_text(self.save_dir / LATEST_FILE, final.name + "\n")
            self._prune()
            if self.on_complete is not None:
                self.on_complete(final, step)
        _barrier(self.group)

    def _prune(self) -> None:
        if not self.keep_last:
            return
        found = complete_checkpoints(self.save_dir)
        for _, path in found[: max(0, len(found) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)
