"""A gate on data prep's work units, for the tests that act at a known point of a prep (not a
test module; the test side is `__init__.py` here).

A test puts this directory on the PYTHONPATH of a prep's interpreters, so each imports it at
start-up (a worker pool's processes too: they fork from a server started with the same
environment). With PREP_GATE_DIR set, it gates the processes of one task: rank PREP_GATE_RANK,
else the Slurm task's SLURM_PROCID.

- Each unit a process of the task finishes is appended to `done-<rank>.txt` (its id, one a line).
- PREP_GATE_ALLOW="rank:units,...": the processes of that rank together finish `units` units;
  a unit one of them starts after those (already claimed: claiming precedes processing) is held:
  the process writes `held-<rank>-<unit>.json` ({"rank", "pid", "unit"}) and stops there until
  it is killed.
- PREP_GATE_AWAIT="rank:units:other,...": the same, except that a unit started after those waits
  until task `other` has finished a unit, then runs (an error after 300 s).

The test then acts at a known point instead of racing a prep that may finish first.
"""

from __future__ import annotations

import json
import os
import signal
import time

AWAIT_S = 300.0


def _ticket(gate: str, rank: str) -> int:
    """The place of the unit being started among those the task's processes started (0, 1, ...),
    one count for all of them (an exclusive create, as the prep's own claims)."""
    folder = os.path.join(gate, f"started-{rank}")
    os.makedirs(folder, exist_ok=True)
    number = 0
    while True:
        try:
            os.close(os.open(os.path.join(folder, str(number)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return number
        except FileExistsError:
            number += 1


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one short append: whole even with several writers
    finally:
        os.close(fd)


def _hold(gate: str, rank: str, unit: str) -> None:
    record = os.path.join(gate, f"held-{rank}-{unit}.json")
    with open(record + ".tmp", "w") as f:
        json.dump({"rank": int(rank), "pid": os.getpid(), "unit": unit}, f)
    os.replace(record + ".tmp", record)  # complete when it appears
    while True:  # until killed (a handled signal returns from pause)
        signal.pause()


def _await(gate: str, other: str) -> None:
    done = os.path.join(gate, f"done-{other}.txt")
    deadline = time.monotonic() + AWAIT_S
    while not (os.path.isfile(done) and os.path.getsize(done) > 0):
        if time.monotonic() > deadline:
            raise RuntimeError(f"prep gate: task {other} finished no unit in {AWAIT_S:.0f} s")
        time.sleep(0.05)


def _install() -> None:
    gate = os.environ.get("PREP_GATE_DIR")
    rank = os.environ.get("PREP_GATE_RANK") or os.environ.get("SLURM_PROCID")
    if not gate or rank is None:
        return
    allow = dict(item.split(":") for item in filter(None, os.environ.get("PREP_GATE_ALLOW", "").split(",")))
    waits = dict(
        item.split(":", 1) for item in filter(None, os.environ.get("PREP_GATE_AWAIT", "").split(","))
    )

    import nemotron.data.prep as prep

    process_unit = prep._process_unit

    if rank in allow and rank in waits:
        raise RuntimeError(f"prep gate: task {rank} is both in PREP_GATE_ALLOW and PREP_GATE_AWAIT")

    def gated(spec):
        if rank in allow and _ticket(gate, rank) >= int(allow[rank]):
            _hold(gate, rank, spec.unit_id)
        if rank in waits:
            units, other = waits[rank].split(":")
            if _ticket(gate, rank) >= int(units):
                _await(gate, other)
        stats = process_unit(spec)
        _append(os.path.join(gate, f"done-{rank}.txt"), f"{spec.unit_id}\n")
        return stats

    # A worker pool gets the function by name: the same name resolves to the gate in a worker.
    gated.__module__, gated.__qualname__ = process_unit.__module__, process_unit.__qualname__
    prep._process_unit = gated


_install()
