"""Triton MoE combine; see ``nemotron.kernels.moe_combine`` for the maths.

Forward: one program per (token, block of hidden channels) reads the token's k rows (and the
optional addend row) and writes the weighted sum once (fp32 accumulation, one rounding). Backward: one program per token; for each of its k
slots it streams the hidden dimension once, writing ``grad_rows[position] = w * dy`` and
accumulating ``grad_w = <dy, row>`` in fp32. Each output element has one writer: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nemotron.kernels.dense import dense_inputs

__all__ = ["weighted_combine_triton", "MOE_COMBINE_TRITON_CONFIG"]

MOE_COMBINE_TRITON_CONFIG = {"block_h": 1024, "num_warps": 4}


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
def _combine_bwd_kernel(ROWS, POS, W, DY, DROWS, DW, H, K: tl.constexpr, BLOCK_H: tl.constexpr,
                        NEED_DROWS: tl.constexpr, NEED_DW: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    for s in tl.static_range(K):
        p = tl.load(POS + t * K + s).to(tl.int64)
        w = tl.load(W + t * K + s).to(tl.float32)
        dot = tl.zeros([BLOCK_H], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = cols < H
            dy = tl.load(DY + t * H + cols, mask=mask, other=0.0).to(tl.float32)
            if NEED_DROWS:
                tl.store(DROWS + p * H + cols, (w * dy).to(DROWS.dtype.element_ty), mask=mask)
            if NEED_DW:
                row = tl.load(ROWS + p * H + cols, mask=mask, other=0.0).to(tl.float32)
                dot += dy * row
        if NEED_DW:
            tl.store(DW + t * K + s, tl.sum(dot, axis=0))


class WeightedCombineFunction(torch.autograd.Function):
    @staticmethod
    @dense_inputs
    def forward(ctx, rows, position, weight, add):
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
        return y

    @staticmethod
    @dense_inputs
    def backward(ctx, dy):
        rows, pos, w = ctx.saved_tensors
        tokens, k = w.shape
        h = rows.shape[1]
        need_rows, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        drows = torch.empty_like(rows) if need_rows else rows
        dw = torch.empty(tokens, k, device=w.device, dtype=torch.float32) if need_w else w
        cfg = MOE_COMBINE_TRITON_CONFIG
        _combine_bwd_kernel[(tokens,)](
            rows, pos, w, dy.contiguous(), drows, dw, h, K=k, BLOCK_H=cfg["block_h"],
            NEED_DROWS=need_rows, NEED_DW=need_w, num_warps=cfg["num_warps"])
        # the addend's gradient is dy itself (no copy)
        dadd = dy if ctx.needs_input_grad[3] else None
        return (drows if need_rows else None), None, (dw.to(w.dtype) if need_w else None), dadd


def weighted_combine_triton(rows: torch.Tensor, order: torch.Tensor | None, position: torch.Tensor,
                            weight: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """rows [tokens*k, hidden] (expert order), position [tokens*k], weight [tokens, k], optional
    add [tokens, hidden] -> y. (`order` is not needed: the backward writes each row's gradient at
    its position.)"""
    return WeightedCombineFunction.apply(rows, position, weight, add)
