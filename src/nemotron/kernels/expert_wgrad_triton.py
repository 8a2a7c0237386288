"""Triton kernel of `nemotron.kernels.expert_wgrad` (see there for what it computes and why).

``_expert_weight_grad_kernel``: one program per (expert, BLOCK_M x BLOCK_N tile of its output),
programs of one expert adjacent (they read the same rows, which stay in L2). Its loop steps
through the expert's rows BLOCK_K at a time, loading [BLOCK_K, BLOCK_M] of G and
[BLOCK_K, BLOCK_N] of X where they are (each row contiguous: coalesced; no transposed or padded
copies: BF16 tensor cores take either operand order, FP8 ones do not, hence the copies
`kernels.fp8_wgrad` makes), rows past the expert's end masked to zero, the product summed in
float32 and written (or added, ``ACCUMULATE``) in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nemotron.kernels.expert_wgrad import _check_operands, check_accumulate_into

__all__ = ["WGRAD_CONFIG", "expert_weight_grad_triton"]


@triton.jit
def _expert_weight_grad_kernel(
    G, X, C, OFFS, M, N, stride_g, stride_x, stride_ce, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACCUMULATE: tl.constexpr,
):  # fmt: skip
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    expert = pid // (tiles_m * tiles_n)
    tile = pid % (tiles_m * tiles_n)
    tm = tile // tiles_n
    tn = tile % tiles_n
    start = tl.load(OFFS + expert - 1, mask=expert > 0, other=0).to(tl.int64)
    end = tl.load(OFFS + expert).to(tl.int64)
    om = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    on = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = om < M
    n_ok = on < N
    ok = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(start, end, BLOCK_K):
        rows = r + ok
        row_ok = rows < end
        g = tl.load(G + rows[:, None] * stride_g + om[None, :], mask=row_ok[:, None] & m_ok[None, :], other=0.0)
        x = tl.load(X + rows[:, None] * stride_x + on[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(g), x, acc)
    out = C + expert.to(tl.int64) * stride_ce + om[:, None].to(tl.int64) * stride_cm + on[None, :]
    keep = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:  # C += the product: a gradient summed over micro-batches where it is written
        acc += tl.load(out, mask=keep, other=0.0)
    tl.store(out, acc, mask=keep)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): timed on an H200 at the proxy's rows (docs/benchmarks.md,
# "Seventeenth round"): 2.38 / 2.51 ms for the two products, (128, 128, 64, 8, 3) 2.86 / 3.09,
# PyTorch's BF16 grouped GEMM 2.26 / 2.25
WGRAD_CONFIG = (128, 256, 64, 8, 3)


def expert_weight_grad_triton(
    grad: torch.Tensor,
    inp: torch.Tensor,
    offs: torch.Tensor,
    accumulate_into: torch.Tensor | None = None,
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """`expert_wgrad.expert_weight_grad_reference` in one launch: grad [R, M], inp [R, N] (any
    float dtype, BF16 on the GPU path; made row-major if they are not), offs [E] int32
    cumulative row counts -> float32 [E, M, N] (or added into `accumulate_into`, returned)."""
    _check_operands(grad, inp, offs)
    grad, inp = grad.contiguous(), inp.contiguous()
    shape = (offs.numel(), grad.shape[1], inp.shape[1])
    if accumulate_into is None:
        out = torch.empty(shape, dtype=torch.float32, device=grad.device)
    else:
        check_accumulate_into(accumulate_into, shape)
        out = accumulate_into
    block_m, block_n, block_k, warps, stages = config or WGRAD_CONFIG
    m, n = shape[1], shape[2]
    grid = (shape[0] * triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    if out.numel():
        _expert_weight_grad_kernel[grid](
            grad, inp, out, offs.to(torch.int32).contiguous(), m, n,
            grad.stride(0), inp.stride(0), out.stride(0), out.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ACCUMULATE=accumulate_into is not None,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return out
