"""Run a function on N gloo processes (forked from a forkserver, `_context`) and collect results."""

from __future__ import annotations

import faulthandler
import multiprocessing.forkserver
import os
import pickle
import queue as queue_module
import signal
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_HOST = "127.0.0.1"
# How long a store operation waits (a key another rank has yet to set: gloo's rendezvous of a
# new group waits there for ranks still busy before it): init_process_group's own store's
# timeout. A launch stuck anywhere is stopped by `_DEADLINE_S` first.
_STORE_TIMEOUT = timedelta(minutes=30)


def _worker(
    rank: int,
    world_size: int,
    port: int,
    stacks_dir: str,
    fn,
    args,
    queue,
    launcher: tuple[dict[str, str], str],
    env_only: bool = False,
) -> None:
    # A rank forked from the server has the environment and working directory the server
    # started with: the launching process's, as they are now, are what a spawned rank has.
    environ, cwd = launcher
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    # Where this rank writes the stacks of all its threads when the parent, about to stop it
    # for giving no result, asks with SIGUSR1: which collective or wait it was blocked in.
    stacks = open(Path(stacks_dir) / f"rank{rank}.txt", "w")  # noqa: SIM115 - open until exit
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    os.environ.update(
        MASTER_ADDR=_HOST,
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    if env_only:
        # What torchrun's agent tells its workers: the store at MASTER_PORT is the agent's (here
        # the test process's), so an env:// init_process_group connects to it as a client on
        # every rank instead of rank 0 binding that port.
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"
    torch.set_num_threads(1)
    try:
        if not env_only:
            store = dist.TCPStore(_HOST, port, world_size, is_master=False, timeout=_STORE_TIMEOUT)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # by value: torch's queue would pass tensors' storage as file descriptors this process
        # serves, which the parent could not fetch once this process had exited (seen in CI:
        # ConnectionResetError in the parent's queue.get)
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report any failure to the parent test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _record(results: dict, errors: dict, rank: int, status: str, value) -> None:
    if status == "ok":
        results[rank] = pickle.loads(value)
    else:
        errors[rank] = value


# How long the other ranks get to report once one has failed or died: they are then most
# likely blocked in a collective that will never complete.
_GRACE_S = 20.0
# How long a launch may run before its ranks that gave no result are stopped (with their
# stacks in the error): below pytest's 600 s timeout, which would stop the test with the stack
# of this process only (waiting for results), saying nothing about where the ranks were stuck.
# The longest launch of the suite takes ~35 s on 2 cores (~70 s with the cores also busy).
_DEADLINE_S = 300.0
# How long a rank asked for its stacks gets to write them before it is terminated.
_STACKS_WAIT_S = 2.0


def _stop(procs, pending: list[int], stacks_dir: str, reason: str) -> dict[int, str]:
    """Stop the ranks in `pending` (no result yet): each is asked for its stacks first.
    Returns each one's error text."""
    for r in pending:
        if procs[r].is_alive():
            os.kill(procs[r].pid, signal.SIGUSR1)
    time.sleep(_STACKS_WAIT_S)
    errors = {}
    for r in pending:
        if procs[r].is_alive():
            procs[r].terminate()
        path = Path(stacks_dir) / f"rank{r}.txt"
        stacks = path.read_text() if path.exists() else ""
        errors[r] = f"{reason} (stopped); its stacks:\n{stacks or '(none written)'}"
    return errors


# The ranks are forked from one server process that has imported these (started at the first
# launch of a test session, then reused): each launch then costs a fork per rank instead of
# a fresh interpreter importing torch and nemotron (~5 s of CPU per rank; with 8 ranks on 2
# cores, ~20 s of each launch; the suite's launches took half the time). The server runs no
# torch operation and no Python thread: a rank starts from torch's state after import, as a
# spawned one does. The ranks' environment and working directory are the launching process's
# (`_worker`); a module reading the environment as it is imported reads the server's.
_PRELOAD = ["torch", "torch.distributed", "nemotron.train.loop", "nemotron.distributed"]


def _context():
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # read once, when the server starts
    return ctx


def start_forkserver() -> None:
    """Start the forkserver the ranks are forked from, preloading `_PRELOAD`, unless one runs.
    There is one forkserver per process and the preload of whoever starts it holds: data prep run
    in-process starts it with its own (no torch), after which every rank imports torch and
    nemotron itself, ~3x the time of a multi-rank test. The session starts it before its first
    test when it will launch ranks (tests/conftest.py)."""
    if "forkserver" in mp.get_all_start_methods():
        _context()
        multiprocessing.forkserver.ensure_running()


def _launch(fn, world_size: int, args, env_only: bool = False) -> tuple[dict[int, object], list[str]]:
    ctx = _context()
    queue = ctx.Queue()
    # The rendezvous store is this process's, listening (on a port the kernel picks as it binds)
    # before any rank starts. A port picked free here and bound later by rank 0 could be taken
    # meanwhile by another process (rank 0 then fails; the others, connecting to whatever holds
    # that port, wait until the store's timeout); and a store held by rank 0 goes away when it
    # exits, while the other ranks may still use it.
    store = dist.TCPStore(
        _HOST, 0, world_size, is_master=True, wait_for_workers=False, timeout=_STORE_TIMEOUT
    )
    with tempfile.TemporaryDirectory(prefix="spawn-stacks-") as stacks_dir:
        procs = [
            ctx.Process(
                target=_worker,
                args=(
                    r,
                    world_size,
                    store.port,
                    stacks_dir,
                    fn,
                    args,
                    queue,
                    (dict(os.environ), os.getcwd()),
                    env_only,
                ),
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, object] = {}
        errors: dict[int, str] = {}
        started = time.monotonic()
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
                            _record(results, errors, rank, status, value)
                        for r in gone:
                            if r not in results and r not in errors:
                                errors[r] = f"exited with code {procs[r].exitcode} without a result"
                else:
                    _record(results, errors, rank, status, value)
                now = time.monotonic()
                if errors and failed_at is None:
                    failed_at = now
                pending = [r for r in range(world_size) if r not in results and r not in errors]
                if failed_at is not None and now - failed_at > _GRACE_S:
                    errors |= _stop(
                        procs, pending, stacks_dir, f"no result {_GRACE_S:.0f} s after another rank failed"
                    )
                    break
                if now - started > _DEADLINE_S:
                    errors |= _stop(
                        procs, pending, stacks_dir, f"no result {_DEADLINE_S:.0f} s after the start"
                    )
                    break
        finally:
            for p in procs:
                p.join(timeout=60 if not errors else 1)
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=10)
            del store  # only now: the ranks have exited
    return results, [f"rank {r}:\n{errors[r]}" for r in sorted(errors)]


def run_distributed(fn, world_size: int, *args, env_only: bool = False) -> list:
    """fn(rank, world_size, *args) on `world_size` processes; returns results by rank and
    raises with the worker traceback if any rank failed (the other ranks, blocked in a
    collective that cannot complete, are stopped after a grace period instead of hanging the
    test), or with the stacks of the ranks that gave no result within `_DEADLINE_S`.

    Each rank runs fn in a gloo process group on this process's store; with `env_only`, in
    none: it has only the environment torchrun gives a process (MASTER_ADDR/MASTER_PORT of the
    store, TORCHELASTIC_USE_AGENT_STORE, RANK, WORLD_SIZE, LOCAL_RANK), for code that joins
    the group itself (`init_process_group` from the environment)."""
    results, errors = _launch(fn, world_size, args, env_only)
    if errors:
        raise AssertionError("distributed worker failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
