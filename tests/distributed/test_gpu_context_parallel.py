"""Context-parallel attention on a GPU (skipped without CUDA; the H200 runs it through
`bash benchmarks/h200_suite.sh gpu-tests`): each rank's queries attend over the gathered keys
through SDPA with a lower-right causal bias and GQA. That must reach a fused kernel; a fallback
would materialise [chunk x prefix] masks and scores (tens of GiB at Nano3 shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemotron.distributed.context_parallel import ContextParallel, cp_chunk_ids, cp_shard

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _rank_view(rank: int, size: int, gathered: dict[int, torch.Tensor]) -> ContextParallel:
    """A ContextParallel for `rank` whose sequence gather returns the whole K or V (what the
    all-gather of every rank's part gives; `gathered` maps id(local part) to it), so one GPU
    checks the attention of each rank."""
    cp = ContextParallel.__new__(ContextParallel)
    cp.group, cp.size, cp.rank, cp.chunk_ids = None, size, rank, cp_chunk_ids(rank, size)
    cp.gather_sequence = lambda x, dim=1: gathered[id(x)]
    return cp


@pytest.mark.parametrize("size", [2, 4])
def test_cp_attention_matches_full_causal_attention_without_materialising_masks(size):
    b, hq, hkv, d, total = 1, 32, 2, 128, 32768  # Nano3 heads; a 32K sequence
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, total, d, device="cuda", generator=gen).bfloat16() for h in (hq, hkv, hkv))
    grad = torch.randn(b, hq, total, d, device="cuda", generator=gen).bfloat16()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for rank in range(size):
        q_local = cp_shard(q, rank, size, dim=2).detach().requires_grad_(True)
        k_full, v_full = k.detach().requires_grad_(True), v.detach().requires_grad_(True)
        k_local, v_local = cp_shard(k, rank, size, dim=2), cp_shard(v, rank, size, dim=2)
        cp = _rank_view(rank, size, {id(k_local): k_full, id(v_local): v_full})
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = cp.attention(q_local, k_local, v_local)
        out.backward(cp_shard(grad, rank, size, dim=2))
        torch.cuda.synchronize()
        peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
        expected = cp_shard(ref, rank, size, dim=2)
        err = ((out.float() - expected.float()).norm() / expected.float().norm()).item()
        assert err < 1e-2, f"rank {rank}/{size}: relative error {err}"
        # A fallback that materialises the [chunk x prefix] scores needs 32 heads x 8192 x 32768 x
        # 4 bytes = 32 GiB at CP2 (16 GiB at CP4); a fused kernel needs the outputs, gradients and at
        # most GQA-expanded K/V and their gradients (1.2 GiB measured at CP2 on an H200).
        assert peak_gib < 4.0, f"rank {rank}/{size}: {peak_gib:.2f} GiB extra (scores materialised?)"
        assert q_local.grad is not None and k_full.grad is not None and v_full.grad is not None
