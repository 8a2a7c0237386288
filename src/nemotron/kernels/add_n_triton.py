"""Triton ``add_n``; see ``nemotron.kernels.add_n``. 1-D blocks over the flattened tensors on grid
axis 0 with int64 offsets (no grid-axis or int32 limit), one read of each input, one write."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["add_n_kernel_call", "ADD_N_TRITON_CONFIG"]

ADD_N_TRITON_CONFIG = {"block": 4096, "num_warps": 8}


@triton.jit
def _add_n_kernel(A, B, C, OUT, N, BLOCK: tl.constexpr, HAS_C: tl.constexpr, COMPUTE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.load(A + offs, mask=mask, other=0.0).to(COMPUTE)
    acc += tl.load(B + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_C:
        acc += tl.load(C + offs, mask=mask, other=0.0).to(COMPUTE)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


def add_n_kernel_call(tensors: Sequence[torch.Tensor], dtype: torch.dtype, compute: torch.dtype) -> torch.Tensor:
    ins = [t.contiguous() for t in tensors]
    out = torch.empty(ins[0].shape, device=ins[0].device, dtype=dtype)
    n = out.numel()
    if n:
        cfg = ADD_N_TRITON_CONFIG
        c = ins[2] if len(ins) == 3 else ins[0]
        _add_n_kernel[(triton.cdiv(n, cfg["block"]),)](
            ins[0], ins[1], c, out, n, BLOCK=cfg["block"], HAS_C=len(ins) == 3,
            COMPUTE=tl.float64 if compute == torch.float64 else tl.float32, num_warps=cfg["num_warps"])
    return out
