"""Ranks other than rank 0 wait for rank 0's index build however long it takes, not the process
group's timeout (`gpt_dataset.cached_arrays`), and learn at once when rank 0 failed or died.
Real gloo ranks (spawned processes) whose process group and store (as torchrun's env:// store)
time out after 5 s."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import numpy as np
import pytest
from distributed._spawn import _launch

# 5 s, not less: the short group's own setup (gloo's connection of the ranks) must finish within
# it, and at 2 s it failed once on a loaded 2-core machine ("Connection closed by peer")
PG_TIMEOUT = timedelta(seconds=5)
SLOW_BUILD_S = 11.0  # over twice the process group's timeout


def _short_timeout_group(rank: int, world_size: int) -> None:
    """Replace the harness's process group by one whose collectives and store time out after
    PG_TIMEOUT."""
    import torch.distributed as dist

    dist.destroy_process_group()
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(address, port, world_size, is_master=False, timeout=PG_TIMEOUT)
    dist.init_process_group(
        "gloo", store=dist.PrefixStore("short", store), rank=rank, world_size=world_size, timeout=PG_TIMEOUT
    )


def _ranks(rank: int, world_size: int, cache: str) -> dict:
    """Rank 0 builds slowly, then fails, then (after the control) dies mid-build: what each
    rank saw, with how long it waited."""
    import torch.distributed as dist

    from nemotron.data.gpt_dataset import GPTDatasetError, cached_arrays

    _short_timeout_group(rank, world_size)
    out: dict = {}

    def slow_build():
        time.sleep(SLOW_BUILD_S)
        return {"a": np.arange(5)}

    start = time.monotonic()
    arrays = cached_arrays(cache, {"entry": "slow"}, ("a",), slow_build)
    out["slow"] = (list(arrays["a"]), time.monotonic() - start)

    def failing_build():
        raise ValueError("the disk is full")

    start = time.monotonic()
    try:
        cached_arrays(cache, {"entry": "failing"}, ("a",), failing_build)
    except (GPTDatasetError, ValueError) as exc:
        out["failing"] = (type(exc).__name__, str(exc), time.monotonic() - start)

    # The control: a barrier of this process group (what the other ranks waited at before)
    # times out while rank 0 is busy for longer than its timeout, so the wait above outlasted it.
    if rank == 0:
        time.sleep(PG_TIMEOUT.total_seconds() + 1.5)
    try:
        dist.barrier()
        out["barrier"] = "passed"
    except RuntimeError:
        out["barrier"] = "timed out"

    def dying_build():
        time.sleep(1.0)
        os._exit(3)  # killed mid-build: no exception, no word to the others

    start = time.monotonic()
    try:
        cached_arrays(cache, {"entry": "dies"}, ("a",), dying_build)
    except GPTDatasetError as exc:
        out["dies"] = (str(exc), time.monotonic() - start)
    return out


@pytest.mark.slow  # waits out a slow rank 0 in real time: ~28 s
def test_other_ranks_outwait_a_slow_rank_zero_and_hear_of_its_failure_or_death(tmp_path):
    results, errors = _launch(_ranks, 2, (str(tmp_path),))
    # rank 0 died in the last build, as meant; rank 1 reported everything
    assert len(errors) == 1 and errors[0].startswith("rank 0") and "exited with code 3" in errors[0], errors
    seen = results[1]
    values, waited = seen["slow"]
    assert values == [0, 1, 2, 3, 4] and waited >= SLOW_BUILD_S - 0.5
    kind, message, waited = seen["failing"]
    assert kind == "GPTDatasetError" and waited < 30
    assert "rank 0 failed to build index cache entry" in message and "ValueError: the disk is full" in message
    assert seen["barrier"] == "timed out"
    message, waited = seen["dies"]
    assert "rank 0 did not finish building index cache entry" in message
    assert waited < 60  # told by the closed connections, not after INDEX_BUILD_TIMEOUT
