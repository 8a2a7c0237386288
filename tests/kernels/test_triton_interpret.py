"""Triton kernels == PyTorch references on CPU, under TRITON_INTERPRET=1 (fp32 tolerance).

The interpreter flag must be set before Triton compiles a kernel, so the checks in
``interpret_checks.py`` run once in a fresh Python process; each test reads its own result.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from interpret_checks import CHECKS  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
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
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_triton_kernel_matches_reference_interpreted(results, name):
    assert results[name] == "ok", results[name]
