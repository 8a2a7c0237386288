"""Triton kernels of `nemotron.kernels.fp8_wgrad` (see there for the layout and the rules).

``_expert_max_kernel``: each expert's inverse scale, the largest of its rows' (one program per
expert; a scatter over the rows would make all of an expert's rows contend for one atomic).

``_transposed_groups_kernel``: one program per tile of [BLOCK_C columns x BLOCK_P padded
positions] of the output; it gathers the source rows (one byte per element), multiplies each by
its ``inv[r] / inv_e`` (0 at padding) and writes the tile transposed. Two launches per form:
the step's backward is launch-heavy enough that a few more small PyTorch ops per form showed
(an H200 host where the FP8 step went 1,257 -> 1,293 ms with them).

``_grouped_weight_grad_kernel``: one program per (expert, output tile); its loop steps through
the expert's padded rows in whole blocks of ``GROUP_ALIGN`` (no masks: padding is zeros and no
expert's block reaches into the next), both operands contiguous along the rows (what the FP8
tensor cores take), float32 accumulation, the two experts' scales applied to the result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nemotron.kernels.fp8 import FLOAT8, FLOAT8_MAX
from nemotron.kernels.fp8_wgrad import GROUP_ALIGN, ExpertRows, check_accumulate_into

__all__ = ["grouped_weight_grad_triton", "transposed_groups_triton"]


@triton.jit
def _expert_max_kernel(INV_ROWS, OFFS, INV_E, BLOCK: tl.constexpr):
    """One program per expert: the largest of its rows' inverse scales (1 with no rows)."""
    expert = tl.program_id(0)
    start = tl.load(OFFS + expert - 1, mask=expert > 0, other=0)
    end = tl.load(OFFS + expert)
    best = tl.zeros((BLOCK,), dtype=tl.float32)
    for r in range(start, end, BLOCK):
        rows = r + tl.arange(0, BLOCK)
        best = tl.maximum(best, tl.load(INV_ROWS + rows, mask=rows < end, other=0.0))
    top = tl.max(best, axis=0)
    tl.store(INV_E + expert, tl.where(end > start, top, 1.0))


@triton.jit
def _transposed_groups_kernel(
    Q, INV_ROWS, INV_E, SOURCE, BLOCK_EXPERT, OUT, n_cols, n_padded, stride_q, stride_out, fp8_max,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    pos = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    pos_ok = pos < n_padded
    col_ok = cols < n_cols
    src = tl.load(SOURCE + pos, mask=pos_ok, other=-1)
    real = src >= 0
    row = tl.where(real, src, 0).to(tl.int64)
    expert = tl.load(BLOCK_EXPERT + pos // GROUP, mask=real, other=0)
    # inv[r] / inv_e: a power of two at most 1; 0 at padding
    ratio = tl.load(INV_ROWS + row, mask=real, other=0.0) / tl.load(INV_E + expert, mask=real, other=1.0)
    x = tl.load(Q + row[:, None] * stride_q + cols[None, :], mask=real[:, None] & col_ok[None, :], other=0.0)
    y = x.to(tl.float32) * ratio[:, None]
    # NaN stays NaN (the reference's clamp keeps it; a NaN row value was written as +-448)
    y = tl.minimum(tl.maximum(y, -fp8_max, propagate_nan=tl.PropagateNan.ALL), fp8_max,
                   propagate_nan=tl.PropagateNan.ALL)
    out = OUT + cols[:, None].to(tl.int64) * stride_out + pos[None, :]
    tl.store(out, tl.trans(y).to(OUT.dtype.element_ty), mask=col_ok[:, None] & pos_ok[None, :])


# (BLOCK_C, BLOCK_P, warps): measured on an H200 at the proxy's rows (docs/benchmarks.md)
TRANSPOSE_CONFIG = (64, 128, 4)


def transposed_groups_triton(
    q: torch.Tensor,
    inv_rows: torch.Tensor,
    layout: ExpertRows,
    out_dtype: torch.dtype = FLOAT8,
    config: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8_wgrad.transposed_groups_reference` in two launches (the experts' scales, then the
    one pass over the values). `out_dtype`: float32 keeps the values unrounded (the CPU
    interpreter's float8 conversion is not IEEE round-to-nearest)."""
    cols = q.shape[1]
    inv_rows = inv_rows.float().contiguous()
    inv_e = torch.empty(layout.experts, dtype=torch.float32, device=q.device)
    if layout.experts:
        _expert_max_kernel[(layout.experts,)](inv_rows, layout.offs, inv_e, BLOCK=1024, num_warps=4)
    out = torch.empty(cols, layout.padded, dtype=out_dtype, device=q.device)
    if cols and layout.padded:
        block_c, block_p, warps = config or TRANSPOSE_CONFIG
        grid = (triton.cdiv(cols, block_c), triton.cdiv(layout.padded, block_p))
        _transposed_groups_kernel[grid](
            q, inv_rows, inv_e, layout.source, layout.block_expert, out, cols, layout.padded,
            q.stride(0), out.stride(0), FLOAT8_MAX,
            BLOCK_C=block_c, BLOCK_P=block_p, GROUP=GROUP_ALIGN, num_warps=warps,
        )  # fmt: skip
    return out, inv_e


# The program's tile and row range are written out here, not taken from a `@triton.jit` helper
# shared with `expert_wgrad_triton`: with such a helper (returning the expert's first row, hinted
# a multiple of BLOCK_K here) Triton 3.6 loaded the rows one byte at a time without the cp.async
# pipeline, and the FP8 proxy's step went 1.19 s -> 5.8 s on an H200 (docs/benchmarks.md,
# "Seventeenth round"; tests/kernels/test_triton_compile.py checks the loads).
@triton.jit
def _grouped_weight_grad_kernel(
    A, B, C, OFFS, A_INV, B_INV, M, N, stride_a, stride_b, stride_ce, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACCUMULATE: tl.constexpr,
    ROUND_BF16: tl.constexpr,
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
    start = tl.multiple_of(start, BLOCK_K)
    om = tm * BLOCK_M + tl.arange(0, BLOCK_M)
    on = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = tl.arange(0, BLOCK_K)
    # rows beyond M / N read row 0 again (always in bounds), their results are not stored
    am = tl.where(om < M, om, 0).to(tl.int64)
    bn = tl.where(on < N, on, 0).to(tl.int64)
    a_ptr = A + am[:, None] * stride_a + (start + ok)[None, :]
    b_ptr = B + bn[:, None] * stride_b + (start + ok)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(start, end, BLOCK_K):
        a = tl.load(a_ptr)
        b = tl.load(b_ptr)
        acc = tl.dot(a, tl.trans(b), acc)
        a_ptr += BLOCK_K
        b_ptr += BLOCK_K
    scale = tl.load(A_INV + expert) * tl.load(B_INV + expert)
    out = C + expert.to(tl.int64) * stride_ce + om[:, None].to(tl.int64) * stride_cm + on[None, :]
    keep = (om < M)[:, None] & (on < N)[None, :]
    value = acc * scale
    if ROUND_BF16:
        # what a BF16 weight gradient holds: rounded to nearest even on the bits (what
        # `.to(tl.bfloat16)` does on the GPU, but the CPU interpreter truncates), NaN kept
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = tl.where(value == value, bits.to(tl.float32, bitcast=True), value)
    if ACCUMULATE:  # C += the product: a gradient summed over micro-batches where it is written
        value += tl.load(out, mask=keep, other=0.0)
    tl.store(out, value.to(C.dtype.element_ty), mask=keep)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); BLOCK_K divides GROUP_ALIGN. Measured on an H200
# at the proxy's rows (docs/benchmarks.md): 1.38 / 1.46 ms for its two products, BF16 2.27 / 2.22
WGRAD_CONFIG = (128, 128, 128, 4, 3)


def grouped_weight_grad_triton(
    at: torch.Tensor,
    a_inv: torch.Tensor,
    bt: torch.Tensor,
    b_inv: torch.Tensor,
    layout: ExpertRows,
    out_dtype: torch.dtype = torch.bfloat16,
    config: tuple[int, int, int, int, int] | None = None,
    accumulate_into: torch.Tensor | None = None,
    round_bf16: bool = False,
) -> torch.Tensor:
    """`fp8_wgrad.grouped_weight_grad_reference`: at [M, P], bt [N, P] (float8 from
    `transposed_groups`, or float32 in the CPU interpreter), a_inv / b_inv [E] -> [E, M, N].
    `accumulate_into` (float32 [E, M, N] contiguous): the product is added to it in the
    kernel's epilogue (no separate pass) and it is returned. `round_bf16`: the product rounded
    to BF16 in the epilogue before it is stored or added."""
    m, n = at.shape[0], bt.shape[0]
    if at.stride(1) != 1 or bt.stride(1) != 1 or at.stride(0) % GROUP_ALIGN or bt.stride(0) % GROUP_ALIGN:
        raise ValueError("grouped_weight_grad_triton: operands must be row-major with aligned rows")
    if accumulate_into is None:
        out = torch.empty(layout.experts, m, n, dtype=out_dtype, device=at.device)
    else:
        check_accumulate_into(accumulate_into, (layout.experts, m, n))
        out = accumulate_into
    block_m, block_n, block_k, warps, stages = config or WGRAD_CONFIG
    if GROUP_ALIGN % block_k:
        raise ValueError(f"grouped_weight_grad_triton: BLOCK_K {block_k} does not divide {GROUP_ALIGN}")
    grid = (layout.experts * triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    if out.numel():
        _grouped_weight_grad_kernel[grid](
            at, bt, out, layout.offs_padded, a_inv.float().contiguous(), b_inv.float().contiguous(),
            m, n, at.stride(0), bt.stride(0), out.stride(0), out.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ACCUMULATE=accumulate_into is not None,
            ROUND_BF16=round_bf16, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return out
