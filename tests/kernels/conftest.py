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
    """{"results": {check: "ok" | error}, "launches": {kernel: launch spec}}"""
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("interpret") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    src = str(HERE.parent.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(HERE / "interpret_checks.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    launches = out.with_name("results.launches.json")
    return {"results": json.loads(out.read_text()), "launches": json.loads(launches.read_text())}
