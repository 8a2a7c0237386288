"""The gloo spawn harness itself: a launch that hangs is stopped with the stacks of its stuck
ranks, and the rendezvous store belongs to the test process (no port picked then bound later,
and a rank exiting first does not take the store away from the others)."""

import time

import torch
import torch.distributed as dist

from . import _spawn
from ._spawn import run_distributed


def _wait_for_each_other(rank, world_size):
    # each rank receives from the other, neither sends: blocked until gloo's 30 min timeout
    dist.recv(torch.zeros(1), src=1 - rank)


def test_ranks_that_give_no_result_are_stopped_with_their_stacks(monkeypatch):
    monkeypatch.setattr(_spawn, "_DEADLINE_S", 5.0)
    start = time.monotonic()
    try:
        run_distributed(_wait_for_each_other, 2)
    except AssertionError as err:
        message = str(err)
    else:
        raise AssertionError("a launch whose ranks never finish returned")
    assert time.monotonic() - start < 60
    for rank in (0, 1):
        report = message.split(f"rank {rank}:\n")[1].split("\nrank ")[0]
        assert "no result 5 s after the start (stopped)" in report, report
        # where it was stuck: faulthandler's frame line of this module's function
        assert "in _wait_for_each_other" in report, report


def _use_the_store_after_rank_0_left(rank, world_size):
    store = dist.distributed_c10d._get_default_store()
    if rank == 0:
        return None  # exits at once (its process group destroyed)
    time.sleep(3.0)
    store.set("after rank 0", "still here")
    return store.get("after rank 0").decode()


def test_the_store_outlives_rank_0():
    # a store held by rank 0 (MASTER_PORT rendezvous) went away with it: the later `set`
    # failed ("Connection reset by peer" / "refused")
    assert run_distributed(_use_the_store_after_rank_0_left, 2) == [None, "still here"]
