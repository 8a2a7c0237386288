"""A Triton grouped FP8 product over row groups (the routed experts' forward and input-gradient
products), the contract of `train.fp8_grouped._scaled_grouped_mm`:

    out[rows of e] = (a_q * a_inv)[rows of e] @ (b_t_q * b_inv)[e]^T      (BF16 out)

a_q [R, K] float8 rows sorted by group, a_inv [R] one inverse scale per row, b_t_q [E, N, K]
float8 (K contiguous: what the FP8 tensor cores take for both operands), b_inv [E, N], offs [E]
the groups' cumulative row counts (int32).

Why it exists: PyTorch's CUTLASS kernel for this product chooses its tile from the groups'
*mean* row count; at the one-GPU proxy's shapes (64 groups of ~2,300 rows, K and N 1,856 / 2,688)
it takes 256 x 128 cooperative tiles and runs at ~1.05 PFLOP/s, where the dense FP8 products of
the same step run at ~1.44 (docs/benchmarks.md, "FP8 training", twelfth round). This kernel lets
the tile, the pipeline depth and the use of the Tensor Memory Accelerator be measured at those
shapes (`benchmarks/fp8_gemms.py --parts grouped_triton`); training uses it with
`train.fp8.experts_grouped_gemm=triton` (`train.fp8_grouped`; CUTLASS stays the default until the
proxy step is measured with it).

Accumulation: on sm_90 Triton's FP8 `tl.dot` keeps the whole contraction in the tensor cores'
accumulator by default (`max_num_imprecise_acc` 2**30, Triton 3.6 and 3.9), which is CUTLASS's
`use_fast_accum=True`; `fast_accum=False` promotes into float32 every `promotion_interval`
products (the `MAX_IMPRECISE` constexpr).

Layout of the work: the row tiles of every group are listed once (`row_tiles`: per tile its
group, first row and the group's end; computed on the device from `offs`, no host sync), and
one program computes one [BLOCK_M x BLOCK_N] output tile of one row tile. A row tile's last
rows may belong to the next group (loaded, multiplied by this group's weights, never stored);
columns past N likewise. The contraction's tail beyond K reads zeros (TMA's out-of-bounds
fill, or the pointer path's mask).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["GroupedConfig", "grouped_mm_triton", "promotion_interval", "row_tile_slots", "row_tiles"]

# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, use_tma[, persistent])
GroupedConfig = tuple[int, ...]
DEFAULT_CONFIG: GroupedConfig = (128, 128, 128, 4, 8, True, False)


def row_tiles(offs: torch.Tensor, block_m: int, max_tiles: int) -> tuple[torch.Tensor, ...]:
    """For each of `max_tiles` row-tile slots: (group, first row, end of the group's rows) as
    int32, and the number of slots in use (a one-element tensor). Slots past it hold group -1.
    Computed with device ops from the cumulative counts `offs`, so the host never waits."""
    offs = offs.to(torch.int64)
    ends = offs
    starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    tiles = (ends - starts + block_m - 1) // block_m
    cum = torch.cumsum(tiles, 0)
    slot = torch.arange(max_tiles, device=offs.device)
    group = torch.searchsorted(cum, slot, right=True)
    used = slot < cum[-1]
    g = group.clamp(max=offs.numel() - 1)
    first = starts[g] + (slot - (cum[g] - tiles[g])) * block_m
    group = torch.where(used, g, -1)
    return (
        group.to(torch.int32),
        torch.where(used, first, 0).to(torch.int32),
        torch.where(used, ends[g], 0).to(torch.int32),
        cum[-1:].to(torch.int32),
    )


@triton.jit
def _grouped_fp8_tile(
    A, B, A_DESC, B_DESC, OUT, A_INV, B_INV, group, first, end, tn, N, K,
    stride_a, stride_b, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr,
    MAX_IMPRECISE: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M x BLOCK_N] output tile: rows first.. of `group` (stored up to `end`),
    columns tn * BLOCK_N.. (stored up to N)."""
    rows = first + tl.arange(0, BLOCK_M)
    cols = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if USE_TMA:
        # B's rows of this group and column tile within the [E * N, K] view; rows past N read
        # the next group's (or zeros past the end) and are never stored
        b_row = group * N + tn * BLOCK_N
        for k in range(0, K, BLOCK_K):
            a = A_DESC.load([first, k])
            b = B_DESC.load([b_row, k])
            acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=MAX_IMPRECISE)
    else:
        a_rows = tl.minimum(rows, end - 1).to(tl.int64)  # rows past the group read its last one
        b_rows = (group.to(tl.int64) * N + tl.minimum(cols, N - 1)).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        for k in range(0, K, BLOCK_K):
            k_ok = (k + ks) < K
            a = tl.load(A + a_rows[:, None] * stride_a + (k + ks)[None, :], mask=k_ok[None, :], other=0.0)
            b = tl.load(B + b_rows[:, None] * stride_b + (k + ks)[None, :], mask=k_ok[None, :], other=0.0)
            acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=MAX_IMPRECISE)
    row_ok = rows < end
    col_ok = cols < N
    a_inv = tl.load(A_INV + rows, mask=row_ok, other=0.0)
    b_inv = tl.load(B_INV + group.to(tl.int64) * N + cols, mask=col_ok, other=0.0)
    out = acc * a_inv[:, None] * b_inv[None, :]
    ptrs = OUT + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_fp8_kernel(
    A, B, A_DESC, B_DESC, OUT, A_INV, B_INV, GROUP, FIRST, END, N, K,
    stride_a, stride_b, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr,
    MAX_IMPRECISE: tl.constexpr,
):  # fmt: skip
    """One program per output tile. The column tile is the grid's fastest dimension: programs
    launched together share their row tile of A (read once from memory, then from L2) and walk
    one group's weights, which stay in L2 across its row tiles."""
    tn = tl.program_id(0)
    tile = tl.program_id(1)
    group = tl.load(GROUP + tile)
    if group >= 0:
        _grouped_fp8_tile(
            A, B, A_DESC, B_DESC, OUT, A_INV, B_INV, group, tl.load(FIRST + tile), tl.load(END + tile), tn,
            N, K, stride_a, stride_b, stride_out, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, MAX_IMPRECISE,
        )  # fmt: skip


@triton.jit
def _grouped_fp8_persistent_kernel(
    A, B, A_DESC, B_DESC, OUT, A_INV, B_INV, GROUP, FIRST, END, USED, N, K,
    stride_a, stride_b, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr,
    MAX_IMPRECISE: tl.constexpr,
):  # fmt: skip
    """One program per multiprocessor, stepping through the output tiles in the order above
    (the number in use read from the device: no host sync)."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    total = tl.load(USED) * tiles_n
    for t in range(tl.program_id(0), total, tl.num_programs(0)):
        tile = t // tiles_n
        _grouped_fp8_tile(
            A, B, A_DESC, B_DESC, OUT, A_INV, B_INV, tl.load(GROUP + tile), tl.load(FIRST + tile),
            tl.load(END + tile), t % tiles_n, N, K, stride_a, stride_b, stride_out,
            BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, MAX_IMPRECISE,
        )  # fmt: skip


def promotion_interval(block_k: int, fast_accum: bool) -> int | None:
    """`tl.dot`'s `max_num_imprecise_acc` for FP8 operands on sm_90: how many products the
    tensor cores' own accumulator (fewer mantissa bits than float32) sums before the result is
    added to a float32 accumulator. Triton's default there is 2**30 (never promoted: CUTLASS's
    `use_fast_accum=True`), returned as None (the default kept). Otherwise every
    min(BLOCK_K, 128) products: CUTLASS's promotion interval without fast accumulation (4 FP8
    `wgmma` instructions of 32 products), and a value Triton accepts (at most the dot's K, at
    least one instruction's 32, below which it gives up the Hopper `wgmma` path)."""
    return None if fast_accum else min(block_k, 128)


def row_tile_slots(rows: int, experts: int, block_m: int) -> int:
    """How many row-tile slots `row_tiles` needs for `rows` rows in `experts` groups: each
    group wastes at most one partial tile."""
    return triton.cdiv(rows, block_m) + experts


def grouped_mm_triton(
    a_q: torch.Tensor,
    a_inv: torch.Tensor,
    b_t_q: torch.Tensor,
    b_inv: torch.Tensor,
    offs: torch.Tensor,
    config: GroupedConfig | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    fast_accum: bool = True,
    tiles: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """The module docstring's product. `config`: (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps,
    use_tma[, persistent]); TMA needs a GPU with it (sm_90+) or the interpreter; persistent: one
    program per multiprocessor looping over the tiles. `out_dtype`: float32 keeps the products
    unrounded (the CPU tests compare them with a float64 reference). `fast_accum`: the FP8
    products sum in the tensor cores' accumulator over the whole contraction (Triton's default
    on sm_90, as CUTLASS's `use_fast_accum=True`); False: promoted to float32 every
    `promotion_interval` products (the interpreter computes in float32 either way).
    `tiles`: `row_tiles(offs, BLOCK_M, row_tile_slots(...))` made once for several products
    over the same groups (the experts' four products of one call), else made here.

    The operands are used in place when contiguous (the experts' own quantizations and the FP8
    forms FSDP2 gathers are: views of contiguous buffers); the inverse scales likewise when
    float32 and contiguous."""
    block_m, block_n, block_k, stages, warps, use_tma, *rest = config or DEFAULT_CONFIG
    persistent = bool(rest[0]) if rest else False
    rows, k = a_q.shape
    experts, n, k_b = b_t_q.shape
    if k_b != k or a_inv.shape != (rows,) or b_inv.shape != (experts, n) or offs.shape != (experts,):
        raise ValueError(
            f"grouped_mm_triton: a {tuple(a_q.shape)}, a_inv {tuple(a_inv.shape)}, b {tuple(b_t_q.shape)}, "
            f"b_inv {tuple(b_inv.shape)}, offs {tuple(offs.shape)} do not fit together"
        )
    out = torch.empty(rows, n, dtype=out_dtype, device=a_q.device)
    if rows == 0 or n == 0 or experts == 0:
        return out
    a_q, b_t_q = a_q.contiguous(), b_t_q.contiguous()
    b_flat = b_t_q.view(experts * n, k)
    max_tiles = row_tile_slots(rows, experts, block_m)
    a_desc = b_desc = None
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor.from_tensor(a_q, [block_m, block_k])
        b_desc = TensorDescriptor.from_tensor(b_flat, [block_n, block_k])
    if tiles is None:
        tiles = row_tiles(offs, block_m, max_tiles)
    elif tiles[0].shape != (max_tiles,):
        raise ValueError(
            f"grouped_mm_triton: {tiles[0].shape[0]} row-tile slots given, {max_tiles} needed "
            f"({rows} rows, {experts} groups, BLOCK_M {block_m})"
        )
    group, first, end, used = tiles
    a_inv, b_inv = a_inv.float().contiguous(), b_inv.float().contiguous()
    strides = (a_q.stride(0), b_flat.stride(0), out.stride(0))
    meta = dict(
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_TMA=bool(use_tma),
        MAX_IMPRECISE=promotion_interval(block_k, fast_accum), num_stages=stages, num_warps=warps,
    )  # fmt: skip
    if persistent:
        programs = torch.cuda.get_device_properties(a_q.device).multi_processor_count if a_q.is_cuda else 4
        _grouped_fp8_persistent_kernel[(programs,)](
            a_q, b_flat, a_desc, b_desc, out, a_inv, b_inv, group, first, end, used, n, k, *strides, **meta
        )
    else:
        grid = (triton.cdiv(n, block_n), max_tiles)
        _grouped_fp8_kernel[grid](a_q, b_flat, a_desc, b_desc, out, a_inv, b_inv, group, first, end, n, k, *strides, **meta)
    return out
