"""Run a function on N gloo processes (torch.multiprocessing spawn) and collect results."""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - report any failure to the parent test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# How long the other ranks get to report once one has failed or died: they are then most
# likely blocked in a collective (or in the store's rendezvous) that will never complete.
_GRACE_S = 20.0


def _launch(fn, world_size: int, args) -> tuple[dict[int, object], list[str]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: dict[int, str] = {}
    failed_at = None
    try:
        while len(results) + len(errors) < world_size:
            try:
                rank, status, value = queue.get(timeout=1.0)
            except queue_module.Empty:
                # a rank that died without reporting (killed, segfault) would otherwise leave
                # the test waiting for its result until pytest's timeout; one that exited has
                # flushed what it put, so a last look at the queue comes first
                gone = [r for r, p in enumerate(procs) if p.exitcode is not None]
                if gone:
                    while True:
                        try:
                            rank, status, value = queue.get(timeout=2.0)
                        except queue_module.Empty:
                            break
                        (results if status == "ok" else errors)[rank] = value
                    for r in gone:
                        if r not in results and r not in errors:
                            errors[r] = f"exited with code {procs[r].exitcode} without a result"
            else:
                (results if status == "ok" else errors)[rank] = value
            if errors and failed_at is None:
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > _GRACE_S:
                for r in range(world_size):
                    if r not in results and r not in errors:
                        errors[r] = f"no result {_GRACE_S:.0f} s after another rank failed (stopped)"
                break
    finally:
        for p in procs:
            p.join(timeout=60 if not errors else 1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
    return results, [f"rank {r}:\n{errors[r]}" for r in sorted(errors)]


def run_distributed(fn, world_size: int, *args) -> list:
    """fn(rank, world_size, *args) on `world_size` processes; returns results by rank and
    raises with the worker traceback if any rank failed (the other ranks, blocked in a
    collective that cannot complete, are stopped after a grace period instead of hanging the
    test). A rendezvous port taken between `_free_port` and the store's bind is retried once."""
    results, errors = _launch(fn, world_size, args)
    if errors and any("Address already in use" in e or "EADDRINUSE" in e for e in errors):
        results, errors = _launch(fn, world_size, args)
    if errors:
        raise AssertionError("distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
