"""Triton MoE routing (sigmoid, biased top-k, renormalised weights); see
``nemotron.kernels.moe_router`` for the maths and the dispatch.

One program owns ``BLOCK_T`` tokens x all experts (128 for Nano3: a [BLOCK_T, 128] fp32 tile
in registers). The top-k is k rounds of "row max of the biased scores, take the first column
holding it, mask it out", so indices come in descending biased score, the lower index first
among equal ones and NaN scores first, as the reference's stable descending sort.
Backward, per token with chosen scores s_j, S = sum_j s_j, weights w_j = c s_j / S and weight
gradients g_j: dL/ds_{i_j} += c (g_j - sum_m g_m s_m / S) / S, plus the scores' own gradient;
dL/dlogits = dL/ds * s (1 - s).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nemotron.kernels.dense import dense_inputs
from nemotron.kernels.moe_router import WEIGHT_EPS, check_top_k

__all__ = ["RouteTopKFunction", "ROUTER_TRITON_CONFIG"]

ROUTER_TRITON_CONFIG = {"block_t": 16, "num_warps": 4}


@triton.jit
def _token_tile(T, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's BLOCK_T tokens x all experts (and the k slots), with the bounds mask."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    return rows, cols, kcols, row_ok, row_ok[:, None] & (cols[None, :] < E)


@triton.jit
def _route_fwd_kernel(LOGITS, BIAS, SCORES, IDX, W, T, E, K, scale, eps,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, cols, kcols, row_ok, mask = _token_tile(T, E, BLOCK_T, BLOCK_E, BLOCK_K)
    logits = tl.load(LOGITS + rows[:, None] * E + cols[None, :], mask=mask, other=0.0)
    s = tl.sigmoid(logits)
    tl.store(SCORES + rows[:, None] * E + cols[None, :], s, mask=mask)
    bias = tl.load(BIAS + cols, mask=cols < E, other=0.0)
    biased = tl.where(mask, s + bias[None, :], float("-inf"))
    # A NaN score ranks first, as in the reference's descending sort: it is chosen and its NaN
    # weight propagates. (Unmapped, NaN equals no row maximum: an all-NaN row took expert id
    # BLOCK_E, out of range, and a partly-NaN row silently skipped its NaN experts.)
    biased = tl.where(biased != biased, float("inf"), biased)
    # The columns still to choose from, kept apart from the values: marking a chosen column
    # -inf made it tie with a -inf biased score (an expert switched off by a -inf bias), so an
    # expert already taken could be taken again (the top-k [0, 0, 0] instead of [0, 1, 2]).
    avail = mask
    chosen_idx = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    chosen_s = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for j in range(K):
        best = tl.max(tl.where(avail, biased, float("-inf")), axis=1)
        # the first available column holding the row maximum
        hit = avail & (biased == best[:, None])
        first = tl.min(tl.where(hit, cols[None, :], BLOCK_E), axis=1)
        take = cols[None, :] == first[:, None]
        s_j = tl.sum(tl.where(take, s, 0.0), axis=1)
        avail = avail & (cols[None, :] != first[:, None])
        chosen_idx = tl.where(kcols[None, :] == j, first.to(tl.int64)[:, None], chosen_idx)
        chosen_s = tl.where(kcols[None, :] == j, s_j[:, None], chosen_s)
    total = tl.sum(chosen_s, axis=1) + eps
    out_mask = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(IDX + rows[:, None] * K + kcols[None, :], chosen_idx, mask=out_mask)
    tl.store(W + rows[:, None] * K + kcols[None, :], chosen_s / total[:, None] * scale, mask=out_mask)


@triton.jit
def _route_bwd_kernel(SCORES, IDX, DSCORES, DW, DLOGITS, T, E, K, scale, eps,
                      HAS_DSCORES: tl.constexpr, HAS_DW: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, cols, kcols, row_ok, mask = _token_tile(T, E, BLOCK_T, BLOCK_E, BLOCK_K)
    offs = rows[:, None] * E + cols[None, :]
    s = tl.load(SCORES + offs, mask=mask, other=0.0)
    if HAS_DSCORES:
        ds = tl.load(DSCORES + offs, mask=mask, other=0.0)
    else:
        ds = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    if HAS_DW:
        kmask = row_ok[:, None] & (kcols[None, :] < K)
        idx = tl.load(IDX + rows[:, None] * K + kcols[None, :], mask=kmask, other=0)
        g = tl.load(DW + rows[:, None] * K + kcols[None, :], mask=kmask, other=0.0)
        total = tl.zeros((BLOCK_T,), dtype=tl.float32)
        gs = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for j in range(K):
            i_j = tl.sum(tl.where(kcols[None, :] == j, idx, 0), axis=1)
            g_j = tl.sum(tl.where(kcols[None, :] == j, g, 0.0), axis=1)
            s_j = tl.sum(tl.where(cols[None, :] == i_j[:, None], s, 0.0), axis=1)
            total += s_j
            gs += g_j * s_j
        total += eps
        for j in range(K):
            i_j = tl.sum(tl.where(kcols[None, :] == j, idx, 0), axis=1)
            g_j = tl.sum(tl.where(kcols[None, :] == j, g, 0.0), axis=1)
            d_j = scale * (g_j - gs / total) / total
            ds += tl.where(cols[None, :] == i_j[:, None], d_j[:, None], 0.0)
    tl.store(DLOGITS + offs, ds * s * (1.0 - s), mask=mask)


def _tiles(e: int, k: int) -> tuple[int, int, int]:
    return ROUTER_TRITON_CONFIG["block_t"], triton.next_power_of_2(e), triton.next_power_of_2(k)


class RouteTopKFunction(torch.autograd.Function):
    @staticmethod
    @dense_inputs
    def forward(ctx, logits, expert_bias, top_k: int, scale: float):
        logits = logits.contiguous()
        t, e = logits.shape
        check_top_k(top_k, e)
        scores = torch.empty_like(logits)
        idx = torch.empty((t, top_k), device=logits.device, dtype=torch.int64)
        weights = torch.empty((t, top_k), device=logits.device, dtype=torch.float32)
        block_t, block_e, block_k = _tiles(e, top_k)
        if t:
            _route_fwd_kernel[(triton.cdiv(t, block_t),)](
                logits, expert_bias.contiguous().float(), scores, idx, weights, t, e, top_k,
                scale, WEIGHT_EPS, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k,
                num_warps=ROUTER_TRITON_CONFIG["num_warps"])
        ctx.save_for_backward(scores, idx)
        ctx.scale = scale
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)
        return scores, idx, weights

    @staticmethod
    @dense_inputs
    def backward(ctx, d_scores, _d_idx, d_weights):
        scores, idx = ctx.saved_tensors
        if d_scores is None and d_weights is None:
            return None, None, None, None
        t, e = scores.shape
        k = idx.shape[1]
        d_logits = torch.empty_like(scores)
        block_t, block_e, block_k = _tiles(e, k)
        if t:
            _route_bwd_kernel[(triton.cdiv(t, block_t),)](
                scores, idx,
                d_scores.contiguous() if d_scores is not None else scores,
                d_weights.contiguous() if d_weights is not None else scores,
                d_logits, t, e, k, ctx.scale, WEIGHT_EPS,
                HAS_DSCORES=d_scores is not None, HAS_DW=d_weights is not None,
                BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=block_k,
                num_warps=ROUTER_TRITON_CONFIG["num_warps"])
        return d_logits, None, None, None
