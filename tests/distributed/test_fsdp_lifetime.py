"""FSDP2 parameter lifetimes that CPU numerics cannot show: freed storage is only read on GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.tensor import DTensor

from ._spawn import run_distributed


def _gathered_after_forward(rank: int, world_size: int) -> dict[str, bool]:
    from nemotron.distributed import ParallelDims, ParallelismConfig, build_mesh, parallelize
    from nemotron.models.nano3.model import Nano3ForCausalLM

    from .harness import tiny_config

    arch = tiny_config()
    parallel = ParallelismConfig()
    mesh = build_mesh(ParallelDims.from_config(parallel, world_size, arch), "cpu")
    with torch.device("meta"):
        model = Nano3ForCausalLM(arch, fused_loss=False)
    parallelize(model, mesh, parallel, mixed_precision=True)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.reset_parameters()
    ids = torch.randint(0, arch.vocab_size, (1, 16))
    out = model(ids, labels=ids)
    # FSDP2 registers the sharded DTensor parameters on a module once it is resharded and the
    # gathered plain tensors while it is unsharded.
    gathered = {
        "lm_head": not isinstance(model.lm_head.weight, DTensor),
        "first_block": not any(isinstance(p, DTensor) for p in model.backbone.layers["0"].parameters()),
    }
    out.loss.backward()
    return gathered


def test_root_parameters_stay_gathered_between_forward_and_backward():
    """The LM head (root FSDP unit) is read again by the first op of backward; torch < 2.13
    hooks no re-gather on the model's dataclass output, so it must not be freed after forward
    (it was: an illegal memory access on 2 GPUs). Blocks are still resharded after forward."""
    for gathered in run_distributed(_gathered_after_forward, 2):
        assert gathered["lm_head"]
        assert not gathered["first_block"]


# FSDP2 on a fake 2-rank process group: collectives do nothing, but parameters are freed and
# re-allocated exactly as on 2 GPUs, so reading a freed weight fails on one GPU (it did, with an
# illegal memory access, before the root unit stopped resharding after forward).
FAKE_TWO_RANKS = """
import torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
from nemotron.distributed import ParallelDims, ParallelismConfig, build_mesh, parallelize
from nemotron.models.nano3.model import Nano3ForCausalLM
from models.tiny import tiny_config
arch, parallel = tiny_config(), ParallelismConfig()
mesh = build_mesh(ParallelDims.from_config(parallel, 2, arch), "cuda")
for fused in (False, True):
    with torch.device("meta"):
        model = Nano3ForCausalLM(arch, fused_loss=fused)
    parallelize(model, mesh, parallel, mixed_precision=True)
    model.to_empty(device="cuda")
    model.reset_parameters()
    for _ in range(2):
        ids = torch.randint(0, arch.vocab_size, (2, 64), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(ids, labels=ids).loss.backward()
    torch.cuda.synchronize()
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_rank_fsdp_reads_no_freed_weight_on_gpu():
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        CUDA_LAUNCH_BLOCKING="1",
        PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", FAKE_TWO_RANKS], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
