"""Triton kernels == PyTorch references on CPU, under TRITON_INTERPRET=1 (fp32 tolerance).

The interpreter flag must be set before Triton compiles a kernel, so the checks in
``interpret_checks.py`` run once in a fresh Python process (the `interpreted` fixture of
conftest.py); each test reads its own result.
"""

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from interpret_checks import CHECKS  # noqa: E402


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_triton_kernel_matches_reference_interpreted(interpreted, name):
    assert interpreted["results"][name] == "ok", interpreted["results"][name]
