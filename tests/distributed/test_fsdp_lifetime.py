"""FSDP2 parameter lifetimes that CPU numerics cannot show: freed storage is only read on GPU."""

from __future__ import annotations

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
    gathered = {"lm_head": not isinstance(model.lm_head.weight, DTensor),
                "first_block": not any(isinstance(p, DTensor)
                                       for p in model.backbone.layers[0].parameters())}
    out.loss.backward()
    return gathered


def test_root_parameters_stay_gathered_between_forward_and_backward():
    """The LM head (root FSDP unit) is read again by the first op of backward; torch < 2.13
    hooks no re-gather on the model's dataclass output, so it must not be freed after forward
    (it was: an illegal memory access on 2 GPUs). Blocks are still resharded after forward."""
    for gathered in run_distributed(_gathered_after_forward, 2):
        assert gathered["lm_head"]
        assert not gathered["first_block"]
