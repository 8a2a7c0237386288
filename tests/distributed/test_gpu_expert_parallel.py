"""The expert-parallel dispatcher's CUDA paths on one GPU (skipped without CUDA; the H200 runs it
through `bash benchmarks/h200_suite.sh gpu-tests`): a one-rank NCCL group, so every row stays on
this GPU, but the counts exchange, the early split-size copy on its own stream, the async row
exchange and the shared expert on the side stream all run as with peers. A full-width MoE
layer must give the local dispatcher's output and gradients bit for bit, with every
combination of the side stream and the early copy."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _run(layer, x):
    leaf = x.detach().requires_grad_()
    y, aux = layer(leaf)
    (y.float().square().mean() + aux).backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters()}
    return y.detach(), leaf.grad.detach(), grads


def test_ep_dispatcher_cuda_streams_match_local_dispatch_bit_for_bit():
    import torch.distributed as dist

    from nemotron.distributed.expert_parallel import AllToAllDispatcher
    from nemotron.distributed.utils import launcher_process_group
    from nemotron.models.nano3 import Nano3Config
    from nemotron.models.nano3.moe import MoE

    cfg = Nano3Config(num_experts=64)
    torch.manual_seed(0)
    reference = MoE(cfg)
    x = torch.randn(1, 4096, cfg.hidden_size, device="cuda").bfloat16()
    with launcher_process_group("cuda", one_rank=True):
        results = {}
        for name, ep, side, early in (
            ("local", False, True, False),
            ("sync", True, False, False),
            ("side", True, True, False),
            ("early", True, False, True),
            ("overlap", True, True, True),
        ):
            layer = MoE(cfg)
            layer.load_state_dict(reference.state_dict())
            layer = layer.cuda().to(torch.bfloat16)
            if ep:
                layer.dispatcher = AllToAllDispatcher(cfg.num_experts, dist.group.WORLD, early_splits=early)
            layer.shared_expert_overlap = side
            for _ in range(2):  # the second pass reuses the streams and pinned buffers
                results[name] = _run(layer, x)
            torch.cuda.synchronize()
    y, dx, grads = results["local"]
    for name in ("sync", "side", "early", "overlap"):
        y2, dx2, grads2 = results[name]
        assert torch.equal(y2, y), name
        assert torch.equal(dx2, dx), name
        for key in grads:
            assert torch.equal(grads2[key], grads[key]), (name, key)
