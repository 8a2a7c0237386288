"""Checkpointer on two gloo processes: rank 0 owns the directory moves, and every rank sees
the same, complete checkpoint when `save` / `poll` / `wait` return. Each test forces the
interleaving that broke before (rank 0 slow to rename; ranks finishing an async write at
different times), so it fails deterministically without the synchronisation."""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from distributed._spawn import run_distributed

from nemotron.train import checkpoint as ckpt_module
from nemotron.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    is_complete,
    load_checkpoint,
    resolve_checkpoint,
)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


def _save_while_rank0_renames_slowly(rank, world, save_dir):
    if rank == 0:
        real_replace = ckpt_module.os.replace

        def slow_replace(src, dst):
            time.sleep(1.0)  # rank 0 is still moving .tmp-iter_* into place ...
            real_replace(src, dst)

        ckpt_module.os.replace = slow_replace
    model = _model()
    path = Checkpointer(save_dir).save(3, model, None, {"step": 3})
    # ... but no rank returns before the checkpoint is complete and `latest` points at it.
    visible = is_complete(path) and resolve_checkpoint(save_dir) == path
    loaded = load_checkpoint(save_dir, _model(), restore_rng=False).train_state
    return visible, sorted(p.name for p in (path / "rng").iterdir()), loaded


@pytest.mark.timeout(120)
def test_every_rank_returns_from_save_only_once_the_checkpoint_is_visible(tmp_path):
    results = run_distributed(_save_while_rank0_renames_slowly, 2, str(tmp_path / "save"))
    for visible, rng_files, state in results:
        assert visible
        assert rng_files == ["rank_00000.pt", "rank_00001.pt"]
        assert state == {"step": 3}
    assert not list((tmp_path / "save").glob(".tmp-*"))


class _LateFuture(Future):
    """Wraps an async save's future; reports done only `delay` seconds after the save began."""

    def __init__(self, inner: Future, delay: float) -> None:
        super().__init__()
        self.inner, self.ready_at = inner, time.monotonic() + delay

    def done(self) -> bool:
        return self.inner.done() and time.monotonic() >= self.ready_at

    def result(self, timeout=None):
        value = self.inner.result(timeout)
        time.sleep(max(0.0, self.ready_at - time.monotonic()))
        return value


def _async_save_finishing_at_different_times(rank, world, save_dir):
    real_async_save = ckpt_module.dcp.async_save
    if rank == 1:
        ckpt_module.dcp.async_save = lambda *a, **k: _LateFuture(real_async_save(*a, **k), 2.0)
    model = _model()
    checkpointer = Checkpointer(save_dir, async_save=True)
    path = checkpointer.save(5, model, None, {"step": 5})
    if rank == 0:
        checkpointer._pending.future.result()  # rank 0's writes are done, rank 1's are not
    checkpointer.poll()
    in_flight_after_poll = checkpointer.in_flight
    # Training goes on: a collective of the loop must pair with the same collective elsewhere.
    total = torch.tensor([rank + 1.0])
    torch.distributed.all_reduce(total)
    checkpointer.wait()
    return in_flight_after_poll, float(total), is_complete(path)


@pytest.mark.timeout(120)  # without a group of its own, the async save deadlocks here
def test_async_save_is_finalized_on_all_ranks_together(tmp_path):
    results = run_distributed(_async_save_finishing_at_different_times, 2, str(tmp_path / "save"))
    assert [r[0] for r in results] == [True, True]  # nobody finalized alone
    assert [r[1] for r in results] == [3.0, 3.0]
    assert all(r[2] for r in results)


def _disagreeing_paths(rank, world, root):
    with pytest.raises(CheckpointError, match="ranks disagree on the checkpoint directory"):
        Checkpointer(Path(root) / f"rank{rank}").save(1, _model(), None, {"step": 1})
    return not any(Path(root).glob("rank*/.tmp-*"))


@pytest.mark.timeout(120)
def test_ranks_that_disagree_on_the_directory_are_refused(tmp_path):
    assert run_distributed(_disagreeing_paths, 2, str(tmp_path)) == [True, True]
