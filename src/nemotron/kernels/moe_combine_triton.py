"""Triton MoE combine; see ``nemotron.kernels.moe_combine`` for the maths.

Forward: one program per (token, block of hidden channels) reads the token's k rows (and the
optional addend row) and writes the weighted sum once (fp32 accumulation, one rounding). Backward: one program per token; for each of its k
slots it streams the hidden dimension once, writing ``grad_rows[position] = w * dy`` and
accumulating ``grad_w = <dy, row>`` in fp32. Each output element has one writer: deterministic.

``FP8_ROWS`` (`weighted_combine(..., row_grad_fp8=True)`): the row gradients are written in their
per-row FP8 form (``kernels.fp8.quantize_rows`` of ``w * dy`` rounded to BF16) instead: a first
pass takes ``amax|dy|``, and each slot's row amax is ``|w| * amax|dy|`` rounded to BF16 as the
row's values are (products and roundings are monotonic, so this is exactly the amax of the BF16
row), so the values are quantized as they are made, one byte written per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nemotron.kernels.dense import dense_inputs
from nemotron.kernels.fp8 import EXPONENT_BITS, FLOAT8, FLOAT8_MAX, QUANT_EPS, fp8_hardware, rowwise
from nemotron.kernels.fp8_rows import Fp8Rows

__all__ = ["weighted_combine_triton", "combine_backward_triton", "MOE_COMBINE_TRITON_CONFIG"]

MOE_COMBINE_TRITON_CONFIG = {"block_h": 1024, "num_warps": 4}
_EXPONENT_BITS = tl.constexpr(EXPONENT_BITS)  # a Triton global must be a constexpr


@triton.jit
def _combine_fwd_kernel(ROWS, POS, W, ADD, Y, H, K: tl.constexpr, BLOCK_H: tl.constexpr,
                        HAS_ADD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    if HAS_ADD:
        acc = tl.load(ADD + t * H + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_H], tl.float32)
    for s in tl.static_range(K):
        p = tl.load(POS + t * K + s).to(tl.int64)
        w = tl.load(W + t * K + s).to(tl.float32)
        acc += w * tl.load(ROWS + p * H + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + t * H + cols, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(ROWS, POS, W, DY, DROWS, DINV, DW, H, fp8_max, eps, K: tl.constexpr,
                        BLOCK_H: tl.constexpr, NEED_DROWS: tl.constexpr, NEED_DW: tl.constexpr,
                        FP8_ROWS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    amax_dy_t = 0.0
    scale = 1.0
    if FP8_ROWS:
        amax_dy = tl.zeros([BLOCK_H], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            dy = tl.load(DY + t * H + cols, mask=cols < H, other=0.0).to(tl.float32)
            amax_dy = tl.maximum(amax_dy, tl.abs(dy))
        amax_dy_t = tl.max(amax_dy, axis=0)
    for s in tl.static_range(K):
        p = tl.load(POS + t * K + s).to(tl.int64)
        w = tl.load(W + t * K + s).to(tl.float32)
        if FP8_ROWS:
            # the row's amax as `quantize_rows` of its BF16 values takes it (see the module docstring)
            amax = tl.maximum((tl.abs(w) * amax_dy_t).to(tl.bfloat16).to(tl.float32), eps)
            ratio = fp8_max / amax
            scale = (ratio.to(tl.int32, bitcast=True) & _EXPONENT_BITS).to(tl.float32, bitcast=True)
            if NEED_DROWS:
                tl.store(DINV + p, 1.0 / scale)
        dot = tl.zeros([BLOCK_H], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = cols < H
            dy = tl.load(DY + t * H + cols, mask=mask, other=0.0).to(tl.float32)
            if NEED_DROWS:
                if FP8_ROWS:
                    q = (w * dy).to(tl.bfloat16).to(tl.float32) * scale
                    q = tl.minimum(tl.maximum(q, -fp8_max, propagate_nan=tl.PropagateNan.ALL), fp8_max,
                                   propagate_nan=tl.PropagateNan.ALL)
                    tl.store(DROWS + p * H + cols, q.to(DROWS.dtype.element_ty), mask=mask)
                else:
                    tl.store(DROWS + p * H + cols, (w * dy).to(DROWS.dtype.element_ty), mask=mask)
            if NEED_DW:
                row = tl.load(ROWS + p * H + cols, mask=mask, other=0.0).to(tl.float32)
                dot += dy * row
        if NEED_DW:
            tl.store(DW + t * K + s, tl.sum(dot, axis=0))


def combine_backward_triton(
    rows: torch.Tensor,
    position: torch.Tensor,
    weight: torch.Tensor,
    dy: torch.Tensor,
    need_rows: bool = True,
    need_weight: bool = True,
    fp8_rows_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The combine's backward: (row gradients [tokens*k, hidden] in rows' dtype, or with
    `fp8_rows_dtype` the per-row quantized values of their BF16 rounding in that dtype (float8 e4m3; float32 keeps
    them unrounded for the CPU interpreter's tests), their float32 inverse scales [tokens*k] (None
    without `fp8_rows_dtype`), weight gradients [tokens, k] float32), each None when not needed."""
    rows, pos, w, dy = rows.contiguous(), position.contiguous(), weight.contiguous(), dy.contiguous()
    tokens, k = w.shape
    h = rows.shape[1]
    fp8 = fp8_rows_dtype is not None
    drows = dinv = dw = None
    if need_rows:
        drows = torch.empty(rows.shape, device=rows.device, dtype=fp8_rows_dtype if fp8 else rows.dtype)
        if fp8:
            dinv = torch.empty(rows.shape[0], device=rows.device, dtype=torch.float32)
    if need_weight:
        dw = torch.empty(tokens, k, device=w.device, dtype=torch.float32)
    cfg = MOE_COMBINE_TRITON_CONFIG
    if tokens:
        _combine_bwd_kernel[(tokens,)](
            rows, pos, w, dy, rows if drows is None else drows, w if dinv is None else dinv,
            w if dw is None else dw, h, FLOAT8_MAX, QUANT_EPS, K=k, BLOCK_H=cfg["block_h"],
            NEED_DROWS=need_rows, NEED_DW=need_weight, FP8_ROWS=fp8, num_warps=cfg["num_warps"])
    return drows, dinv, dw


class WeightedCombineFunction(torch.autograd.Function):
    @staticmethod
    @dense_inputs
    def forward(ctx, rows, position, weight, add, row_grad_fp8=False):
        tokens, k = weight.shape
        h = rows.shape[1]
        rows = rows.contiguous()
        w = weight.contiguous()
        pos = position.contiguous()
        y = torch.empty(tokens, h, device=rows.device, dtype=rows.dtype)
        cfg = MOE_COMBINE_TRITON_CONFIG
        _combine_fwd_kernel[(tokens, triton.cdiv(h, cfg["block_h"]))](
            rows, pos, w, y if add is None else add.contiguous(), y, h, K=k,
            BLOCK_H=cfg["block_h"], HAS_ADD=add is not None, num_warps=cfg["num_warps"])
        ctx.save_for_backward(rows, pos, w)
        ctx.row_grad_fp8 = row_grad_fp8
        return y

    @staticmethod
    @dense_inputs
    def backward(ctx, dy):
        rows, pos, w = ctx.saved_tensors
        need_rows, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        # Triton converts to e4m3 only from compute capability 8.9: elsewhere BF16 rows, quantized after
        in_kernel = ctx.row_grad_fp8 and fp8_hardware(rows.device)
        drows, dinv, dw = combine_backward_triton(
            rows, pos, w, dy, need_rows, need_w, fp8_rows_dtype=FLOAT8 if in_kernel else None
        )
        if need_rows and ctx.row_grad_fp8:
            assert drows is not None
            q, inv = (drows, dinv) if in_kernel else rowwise(drows.to(torch.bfloat16))
            drows = Fp8Rows(q, inv, rows.dtype)
        # the addend's gradient is dy itself (no copy)
        dadd = dy if ctx.needs_input_grad[3] else None
        return drows, None, (dw.to(w.dtype) if dw is not None else None), dadd, None


def weighted_combine_triton(rows: torch.Tensor, order: torch.Tensor | None, position: torch.Tensor,
                            weight: torch.Tensor, add: torch.Tensor | None = None,
                            row_grad_fp8: bool = False) -> torch.Tensor:
    """rows [tokens*k, hidden] (expert order), position [tokens*k], weight [tokens, k], optional
    add [tokens, hidden] -> y. (`order` is not needed: the backward writes each row's gradient at
    its position.) `row_grad_fp8`: the rows' gradient is an `Fp8Rows`."""
    return WeightedCombineFunction.apply(rows, position, weight, add, row_grad_fp8)
