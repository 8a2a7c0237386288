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
    seeds its own tensors) run in two processes at once, each half of them in order; a
    kernel's launch spec is the first launch in that order, as one process would record it."""
    pytest.importorskip("triton")
    sys.path.insert(0, str(HERE))
    from interpret_checks import CHECKS

    names = list(CHECKS)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    src = str(HERE.parent.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    directory = tmp_path_factory.mktemp("interpret")
    outs = [directory / f"results{i}.json" for i in range(len(halves))]
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "interpret_checks.py"), str(out), *half],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out, half in zip(outs, halves, strict=True)
    ]
    results: dict = {}
    launches: dict = {}
    for proc, out in zip(procs, outs, strict=True):
        _, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-4000:]
        results.update(json.loads(out.read_text()))
        for kernel, spec in json.loads(out.with_name(out.stem + ".launches.json").read_text()).items():
            launches.setdefault(kernel, spec)
    return {"results": results, "launches": launches}
