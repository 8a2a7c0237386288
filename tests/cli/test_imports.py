"""`nemotron --help` answers at once: the CLI imports torch (and the library) only inside the
commands that run something."""

from __future__ import annotations

import os
import subprocess
import sys

import nemotron

SRC = os.path.dirname(os.path.dirname(nemotron.__file__))

CHECK = """
import sys
import nemotron.cli.main as main
heavy = [m for m in ("torch", "numpy", "nemotron.config", "nemotron.train.loop") if m in sys.modules]
assert not heavy, f"importing the CLI imported {heavy}"
for argv in (["--help"], ["nano3", "pretrain", "--help"], ["nano3", "data", "prep", "pretrain", "--help"]):
    try:
        main.app(argv)
    except SystemExit as exit:
        assert exit.code == 0, (argv, exit.code)
    assert "torch" not in sys.modules, f"nemotron {' '.join(argv)} imported torch"
# A dry run shows the whole plan (config, layout, steps) without the training stack.
try:
    main.app(["nano3", "pretrain", "-c", "default", "--dry-run"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
assert "torch" not in sys.modules, "nemotron nano3 pretrain --dry-run imported torch"
"""


def test_cli_and_help_do_not_import_torch():
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
