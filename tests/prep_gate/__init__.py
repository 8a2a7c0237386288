"""The test side of the work-unit gate (`sitecustomize.py` here, which says what it does): the
environment that gates a prep's processes, and what the gate recorded.

Used by the tests that kill a prep mid-way or need every task to take units
(tests/data/test_prep.py, tests/data/test_prep_tasks.py, tests/launch/test_slurm.py): they act
when the gate says the prep has reached a known point, never when a poll happens to catch it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

# The directory to put on a prep interpreter's PYTHONPATH.
GATE_PATH = Path(__file__).resolve().parent


def gated_env(
    gate: Path, rank: int | None = None, allow: str = "", await_: str = "", base: dict | None = None
) -> dict[str, str]:
    """`base` (default: this process's environment) with the gate on PYTHONPATH and its settings:
    records in `gate` (made here), `rank` (else the Slurm task's), `allow` (PREP_GATE_ALLOW),
    `await_` (PREP_GATE_AWAIT)."""
    gate.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GATE_PATH), env.get("PYTHONPATH")) if p)
    env["PREP_GATE_DIR"] = str(gate)
    for key, value in (("PREP_GATE_RANK", rank), ("PREP_GATE_ALLOW", allow), ("PREP_GATE_AWAIT", await_)):
        env.pop(key, None)
        if value not in (None, ""):
            env[key] = str(value)
    return env


def finished(gate: Path) -> dict[int, list[str]]:
    """The units each task finished (in the order its processes finished them)."""
    return {
        int(path.stem.removeprefix("done-")): path.read_text().split()
        for path in sorted(gate.glob("done-*.txt"))
    }


def held(gate: Path) -> dict[int, list[dict]]:
    """The hold records ({"rank", "pid", "unit"}) of each task."""
    records: dict[int, list[dict]] = {}
    for path in sorted(gate.glob("held-*.json")):
        record = json.loads(path.read_text())
        records.setdefault(record["rank"], []).append(record)
    return records


def wait_for_holds(
    gate: Path, holds: dict[int, int], check: Callable[[], None], timeout_s: float = 300, poll_s: float = 0.05
) -> dict[int, list[dict]]:
    """The hold records once task `rank` holds `holds[rank]` units, for each rank (the gate stops
    them there whatever the timing). `check` is called between looks (every `poll_s`); it fails
    the test if the prep ended first."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = held(gate)
        counts = {rank: len(records.get(rank, [])) for rank in holds}
        assert set(records) <= set(holds) and all(counts[r] <= holds[r] for r in holds), records
        if counts == holds:
            return records
        check()
        assert time.monotonic() < deadline, f"holds {counts} after {timeout_s} s, expected {holds}"
        time.sleep(poll_s)
