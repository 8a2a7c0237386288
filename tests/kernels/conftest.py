"""One run of `interpret_checks.py` (a fresh Python with TRITON_INTERPRET=1, the flag must be
set before Triton compiles anything) shared by the tests that read its results and the kernel
launches it recorded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def interpreted(tmp_path_factory) -> dict:
    """{"results": {check: "ok" | error}, "launches": {kernel: launch spec}}. The checks (each
    seeds its own tensors) run in two processes at once, each taking the next check not yet
    claimed (`--claim-in`); a kernel's launch spec is its first launch in the checks' order, as
    one process running them all in order would record it."""
    pytest.importorskip("triton")
    sys.path.insert(0, str(HERE))
    from interpret_checks import CHECKS

    # the longest checks sit near the end of CHECKS: claimed from the end, they start first and
    # the two processes finish together on short ones
    claim_order = list(reversed(CHECKS))
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    src = str(HERE.parent.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    directory = tmp_path_factory.mktemp("interpret")
    claims = directory / "claims"
    claims.mkdir()
    outs = [directory / f"results{i}.json" for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "interpret_checks.py"),
                str(out),
                "--claim-in",
                str(claims),
                *claim_order,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    results: dict = {}
    launches_by_check: dict = {}
    for proc, out in zip(procs, outs, strict=True):
        _, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-4000:]
        results.update(json.loads(out.read_text()))
        launches_by_check.update(json.loads(out.with_name(out.stem + ".launches.json").read_text()))
    assert set(results) == set(CHECKS), f"checks not run: {set(CHECKS) - set(results)}"
    launches: dict = {}
    for check in CHECKS:
        for kernel, spec in launches_by_check.get(check, {}).items():
            launches.setdefault(kernel, spec)
    return {"results": results, "launches": launches}
