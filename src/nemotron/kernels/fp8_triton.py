"""Triton rowwise FP8 quantization; see ``nemotron.kernels.fp8`` for the reference and dispatch.

One pass over the tensor: each program loads ``ROWS`` whole rows (``BLOCK_K``, the row length
rounded up to a power of two, at most ``MAX_ROW``), takes each row's amax, and writes the float8
values and one float32 inverse scale per row: one read and one write per element. The
compiled PyTorch reference (`torch.compile` of `quantize_rows`) reads every row twice (a looped
reduction for the amax, then the cast): on the H200 profile of the proxy it was the largest
quantization cost (~0.9 ms per call for [147456, 2688]).

``RELU2``: quantize ``relu(x)^2`` (fp32) instead of ``x``: the squared ReLU of the routed experts
fused with the quantization of its output, which is never stored in BF16.

``quantize_transposed_triton``: a weight [E, N, K] scaled by one power of two per matrix and
written transposed [E, K, N] in float8, one tile per program (coalesced read along K and write
along N); with the row kernel's ``round_bf16`` it makes the experts' gathered FP8 forms from
the float32 master weights (`train.fp8_gather.pack_forms`) in two passes.

The scale is computed exactly as the reference does: ``448 / amax`` in fp32 with its mantissa
bits cleared (the largest power of two not above it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nemotron.kernels.dense import dense
from nemotron.kernels.fp8 import EXPONENT_BITS, FLOAT8_MAX, QUANT_EPS

__all__ = [
    "MAX_ROW",
    "quantize_rows_triton",
    "quantize_rows_to_triton",
    "quantize_transposed_triton",
    "relu2_backward_rows_triton",
]

MAX_ROW = 8192  # longest row held in registers at once (wider rows take the reference)
_ELEMENTS_PER_PROGRAM = 8192
_EXPONENT_BITS = tl.constexpr(EXPONENT_BITS)  # a Triton global must be a constexpr


@triton.jit
def _store_rows(x, Q, INV, rows, cols, row_ok, mask, stride_q, fp8_max, eps):
    """x's rows (float32) quantized: one power-of-two scale per row (448 / amax with its mantissa
    bits cleared), values to Q, inverse scales to INV. NaN stays NaN (as in the reference's
    clamp): a NaN activation must reach the loss."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), eps)
    ratio = fp8_max / amax
    scale = (ratio.to(tl.int32, bitcast=True) & _EXPONENT_BITS).to(tl.float32, bitcast=True)
    q = x * scale[:, None]
    q = tl.minimum(tl.maximum(q, -fp8_max, propagate_nan=tl.PropagateNan.ALL), fp8_max, propagate_nan=tl.PropagateNan.ALL)
    tl.store(Q + rows[:, None] * stride_q + cols[None, :], q.to(Q.dtype.element_ty), mask=mask)
    tl.store(INV + rows, 1.0 / scale, mask=row_ok)


@triton.jit
def _load_rows(X, n_rows, n_cols, stride_x, BLOCK_K: tl.constexpr, ROWS: tl.constexpr):
    """This program's ROWS whole rows of X as float32 (zero past the ends), with their indices,
    the column offsets and the masks."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return x, rows, cols, row_ok, mask


@triton.jit
def _quantize_rows_kernel(
    X, Q, INV, n_rows, n_cols, stride_x, stride_q, fp8_max, eps,
    BLOCK_K: tl.constexpr, ROWS: tl.constexpr, RELU2: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    x, rows, cols, row_ok, mask = _load_rows(X, n_rows, n_cols, stride_x, BLOCK_K, ROWS)
    if ROUND_BF16:  # float32 master weights quantized from their BF16 values
        x = x.to(tl.bfloat16).to(tl.float32)
    if RELU2:
        x = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
        x = x * x
    _store_rows(x, Q, INV, rows, cols, row_ok, mask, stride_q, fp8_max, eps)


def quantize_rows_triton(
    x: torch.Tensor,
    relu2: bool = False,
    out_dtype: torch.dtype = torch.float8_e4m3fn,
    round_bf16: bool = False,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`nemotron.kernels.fp8.quantize_rows(x)` (of ``relu(x)^2`` with `relu2`) in one pass:
    x [..., K] with K <= `MAX_ROW` -> (float8 [..., K] contiguous, float32 inverse scales [...]).
    `out_dtype`: the values' dtype (float32 keeps them unrounded: the CPU interpreter's float8
    conversion is not IEEE round-to-nearest, so its tests take the rounding from PyTorch).
    `round_bf16`: quantize x rounded to BF16 first (`quantize_rows(x.bfloat16())` of float32
    master weights without a BF16 copy). `out`: (values [rows, K] with contiguous rows, inverse
    scales [rows] contiguous) to write into, returned as they are."""
    x = dense(x)
    k = x.shape[-1]
    if not 0 < k <= MAX_ROW:
        raise ValueError(f"quantize_rows_triton: rows of {k} elements (1 to {MAX_ROW} taken)")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = x2.shape[0]
    if out is None:
        q = torch.empty((n, k), dtype=out_dtype, device=x.device)
        inv = torch.empty(n, dtype=torch.float32, device=x.device)
    else:
        q, inv = out
        if q.shape != (n, k) or q.stride(-1) != 1 or inv.shape != (n,) or not inv.is_contiguous():
            raise ValueError(f"quantize_rows_triton: out {tuple(q.shape)}, {tuple(inv.shape)} for {n} rows of {k}")
    if n:
        block_k = triton.next_power_of_2(k)
        rows = max(1, _ELEMENTS_PER_PROGRAM // block_k)
        _quantize_rows_kernel[(triton.cdiv(n, rows),)](
            x2, q, inv, n, k, x2.stride(0), q.stride(0), FLOAT8_MAX, QUANT_EPS,
            BLOCK_K=block_k, ROWS=rows, RELU2=relu2, ROUND_BF16=round_bf16, num_warps=8,
        )  # fmt: skip
    if out is not None:
        return out
    return q.reshape(x.shape), inv.reshape(x.shape[:-1])


@triton.jit
def _quantize_transposed_kernel(
    W, INV, QT, n, k, stride_we, stride_wn, stride_qe, stride_qk, fp8_max,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUND_BF16: tl.constexpr,
):  # fmt: skip
    # One [BLOCK_N, BLOCK_K] tile of matrix e of W [E, N, K], scaled by 1 / INV[e] (a power of
    # two: exact), clamped, written transposed into QT [E, K, N]: the tile makes both the read
    # along K and the write along N coalesced.
    e = tl.program_id(2).to(tl.int64)
    ns = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (ns[:, None] < n) & (ks[None, :] < k)
    w = tl.load(W + e * stride_we + ns[:, None] * stride_wn + ks[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROUND_BF16:
        w = w.to(tl.bfloat16).to(tl.float32)
    y = w * (1.0 / tl.load(INV + e))
    # NaN stays NaN, as the reference's clamp keeps it
    y = tl.minimum(tl.maximum(y, -fp8_max, propagate_nan=tl.PropagateNan.ALL), fp8_max,
                   propagate_nan=tl.PropagateNan.ALL)
    tl.store(QT + e * stride_qe + ks[:, None] * stride_qk + ns[None, :], tl.trans(y).to(QT.dtype.element_ty),
             mask=tl.trans(mask))


# (BLOCK_N, BLOCK_K, warps) of `_quantize_transposed_kernel`: the default and, on a GPU, the
# tiles it is tuned over (the tile changes the time, never a value: no sum crosses a tile)
TRANSPOSED_TILE = (64, 128, 4)
TRANSPOSED_TILES = ((64, 128, 4), (128, 64, 4), (128, 64, 8), (64, 64, 4), (128, 128, 8), (32, 128, 4))
_TRANSPOSED_TUNED: list = []


def _transposed_tuned():
    if not _TRANSPOSED_TUNED:
        configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w) for bn, bk, w in TRANSPOSED_TILES]
        key = ["n", "k", "stride_we", "stride_wn", "stride_qe", "stride_qk"]
        _TRANSPOSED_TUNED.append(triton.autotune(configs=configs, key=key)(_quantize_transposed_kernel))
    return _TRANSPOSED_TUNED[0]


def quantize_transposed_triton(
    w: torch.Tensor,
    inv: torch.Tensor,
    out_dtype: torch.dtype = torch.float8_e4m3fn,
    round_bf16: bool = False,
    out: torch.Tensor | None = None,
    tile: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """The values of `nemotron.kernels.fp8.quantize_transposed(w, inv)` in one pass: w [E, N, K]
    (rows contiguous), one power-of-two inverse scale per matrix inv [E] -> float8 [E, K, N]
    contiguous (or written into `out`, [E, K, N] with contiguous rows). `round_bf16` and
    `out_dtype` as in `quantize_rows_triton`. `tile`: (BLOCK_N, BLOCK_K, warps); None: on a GPU
    the fastest of `TRANSPOSED_TILES` for these shapes (tuned on first use), else
    `TRANSPOSED_TILE`."""
    w = dense(w)
    if w.dim() != 3 or w.stride(-1) != 1:
        raise ValueError(f"quantize_transposed_triton: w must be [E, N, K] with contiguous rows, got {tuple(w.shape)}")
    e, n, k = w.shape
    if out is None:
        out = torch.empty((e, k, n), dtype=out_dtype, device=w.device)
    elif out.shape != (e, k, n) or out.stride(-1) != 1:
        raise ValueError(f"quantize_transposed_triton: out {tuple(out.shape)} for w {tuple(w.shape)}")
    if not out.numel():
        return out
    args = (w, inv.float().contiguous(), out, n, k, w.stride(0), w.stride(1), out.stride(0), out.stride(1), FLOAT8_MAX)
    if tile is None and w.is_cuda:
        grid = lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(n, meta["BLOCK_N"]), e)  # noqa: E731
        _transposed_tuned()[grid](*args, ROUND_BF16=round_bf16)
        return out
    bn, bk, warps = tile or TRANSPOSED_TILE
    _quantize_transposed_kernel[(triton.cdiv(k, bk), triton.cdiv(n, bn), e)](
        *args, BLOCK_N=bn, BLOCK_K=bk, ROUND_BF16=round_bf16, num_warps=warps
    )
    return out


@triton.jit
def _quantize_rows_to_kernel(
    X, POS, Q, INV, n_rows, n_cols, stride_x, stride_q, fp8_max, eps,
    K: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    x, rows, cols, row_ok, mask = _load_rows(X, n_rows, n_cols, stride_x, BLOCK_K, ROWS)
    for s in tl.static_range(K):
        dest = tl.load(POS + rows * K + s, mask=row_ok, other=0).to(tl.int64)
        _store_rows(x, Q, INV, dest, cols, row_ok, mask, stride_q, fp8_max, eps)


def quantize_rows_to_triton(
    x: torch.Tensor, position: torch.Tensor, k: int, out_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """`nemotron.kernels.fp8.quantize_rows_to(x, position, k)` in one pass: x [tokens, K] (K <=
    `MAX_ROW`), position [tokens*k] -> (float8 [tokens*k, K], float32 [tokens*k]); each row read
    once and written to its k places. `out_dtype` as in `quantize_rows_triton`."""
    x = dense(x)
    n, cols = x.shape
    if not 0 < cols <= MAX_ROW:
        raise ValueError(f"quantize_rows_to_triton: rows of {cols} elements (1 to {MAX_ROW} taken)")
    if position.numel() != n * k:
        raise ValueError(f"quantize_rows_to_triton: {position.numel()} positions for {n} rows x {k}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty((n * k, cols), dtype=out_dtype, device=x.device)
    inv = torch.empty(n * k, dtype=torch.float32, device=x.device)
    if n:
        block_k = triton.next_power_of_2(cols)
        rows = max(1, _ELEMENTS_PER_PROGRAM // block_k)
        _quantize_rows_to_kernel[(triton.cdiv(n, rows),)](
            x, dense(position).contiguous(), q, inv, n, cols, x.stride(0), q.stride(0), FLOAT8_MAX,
            QUANT_EPS, K=k, BLOCK_K=block_k, ROWS=rows, num_warps=8,
        )  # fmt: skip
    return q, inv


@triton.jit
def _relu2_backward_rows_kernel(
    HPRE, GRAD, HQ, HINV, DQ, DINV, n_rows, n_cols, stride_h, stride_g, stride_hq, stride_dq, fp8_max, eps,
    BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    h_pre = tl.load(HPRE + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0)
    g = tl.load(GRAD + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.maximum(h_pre.to(tl.float32), 0.0, propagate_nan=tl.PropagateNan.ALL)
    # dh_pre rounded to h_pre's dtype first, as the reference (and the BF16 path) stores it
    dh = (g * 2.0 * r).to(h_pre.dtype).to(tl.float32)
    h = r * r
    _store_rows(h, HQ, HINV, rows, cols, row_ok, mask, stride_hq, fp8_max, eps)
    _store_rows(dh, DQ, DINV, rows, cols, row_ok, mask, stride_dq, fp8_max, eps)


def relu2_backward_rows_triton(
    h_pre: torch.Tensor, grad_h: torch.Tensor, out_dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`nemotron.kernels.fp8.relu2_backward_rows` in one pass: h_pre, grad_h [R, K] (K <=
    `MAX_ROW`) -> (h's per-row FP8 form and inverse scales, dh_pre's), nothing in BF16 written.
    `out_dtype` as in `quantize_rows_triton`."""
    h_pre, grad_h = dense(h_pre).contiguous(), dense(grad_h).contiguous()
    n, k = h_pre.shape
    if not 0 < k <= MAX_ROW:
        raise ValueError(f"relu2_backward_rows_triton: rows of {k} elements (1 to {MAX_ROW} taken)")
    outs = []
    for _ in range(2):
        outs += [torch.empty((n, k), dtype=out_dtype, device=h_pre.device), torch.empty(n, dtype=torch.float32, device=h_pre.device)]
    h_q, h_inv, d_q, d_inv = outs
    if n:
        block_k = triton.next_power_of_2(k)
        rows = max(1, _ELEMENTS_PER_PROGRAM // 2 // block_k)
        _relu2_backward_rows_kernel[(triton.cdiv(n, rows),)](
            h_pre, grad_h, h_q, h_inv, d_q, d_inv, n, k, h_pre.stride(0), grad_h.stride(0),
            h_q.stride(0), d_q.stride(0), FLOAT8_MAX, QUANT_EPS, BLOCK_K=block_k, ROWS=rows, num_warps=8,
        )  # fmt: skip
    return h_q, h_inv, d_q, d_inv
