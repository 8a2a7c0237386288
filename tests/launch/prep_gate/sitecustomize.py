"""A gate on data prep's work units, for tests/launch/test_slurm.py (not a test module).

The gated profile's `python` wrapper puts this directory on PYTHONPATH, so every interpreter
of the job imports it at start-up. With PREP_GATE_DIR and PREP_GATE_ALLOW ("rank:units,...")
set, the Slurm task of each listed rank (SLURM_PROCID) processes that many work units; at the
next one (already claimed: claiming precedes processing) it writes `paused-<rank>.json`
(its pid and the unit's id) into PREP_GATE_DIR and stops there until it is killed. The test
then acts at a known point of the run instead of racing a job that may finish first.
"""

from __future__ import annotations

import json
import os
import signal


def _install() -> None:
    gate, rank = os.environ.get("PREP_GATE_DIR"), os.environ.get("SLURM_PROCID")
    if not gate or rank is None:
        return
    allowed = dict(item.split(":") for item in os.environ["PREP_GATE_ALLOW"].split(","))
    if rank not in allowed:
        return
    budget = int(allowed[rank])

    import nemotron.data.prep as prep

    process_unit = prep._process_unit
    started = 0

    def gated(spec):
        nonlocal started
        if started == budget:
            record = os.path.join(gate, f"paused-{rank}.json")
            with open(record + ".tmp", "w") as f:
                json.dump({"pid": os.getpid(), "unit": spec.unit_id}, f)
            os.replace(record + ".tmp", record)  # complete when it appears
            while True:  # until killed (a handled signal returns from pause)
                signal.pause()
        started += 1
        return process_unit(spec)

    prep._process_unit = gated


_install()
