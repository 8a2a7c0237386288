"""Loading and validating a config (dry runs, launch plans, the CLI's config errors) must not pay
for importing torch: the config schema only needs the sections' dataclasses."""

from __future__ import annotations

import os
import subprocess
import sys

import nemotron

SRC = os.path.dirname(os.path.dirname(nemotron.__file__))

CHECK = """
import sys
from nemotron.config.loader import load_config
from nemotron.config.schema import PretrainConfig
cfg = load_config("default", ["model.num_layers=52"], PretrainConfig)
assert cfg.model.arch().num_layers == 52
assert "torch" not in sys.modules, "loading a config imported torch"
import nemotron.distributed, nemotron.models.nano3
assert "torch" not in sys.modules, "importing the packages imported torch"
nemotron.distributed.ParallelDims  # the lazy names still resolve
assert nemotron.models.nano3.Nano3ForCausalLM.__name__ == "Nano3ForCausalLM"
"""

# `parallelize` is a function only (its module is `apply`): importing the submodule first must
# not change what the package gives.
CLASH = """
import nemotron.distributed.apply
from nemotron.distributed.apply import restore_reshard_after_forward
from nemotron.distributed import parallelize
assert callable(parallelize) and parallelize.__module__ == "nemotron.distributed.apply"
"""


def _run(code: str) -> None:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_config_loading_does_not_import_torch():
    _run(CHECK)


def test_parallelize_is_the_function_whichever_import_comes_first():
    _run(CLASH)
