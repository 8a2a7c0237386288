"""Triton SSD scan (forward and backward), checked against ``nemotron.kernels.ssd`` references.

Importing this module imports Triton; ``nemotron.kernels.ssd.ssd`` only does so on CUDA.
Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (that is how CI tests them).

Notation per (batch, head), chunk ``c`` of length ``Q``, positions ``i, j`` inside the chunk,
``a`` the within-chunk cumulative log-decay ``cumsum(dt * A)``, ``u_j = dt_j x_j``,
``S_c`` the state entering chunk ``c`` (``S_0`` the initial state)::

    y_i      = exp(a_i) C_i . S_c + sum_{j<=i} (C_i . B_j) exp(a_i - a_j) u_j
    S_{c+1}  = exp(a_Q) S_c + sum_j exp(a_Q - a_j) u_j B_j^T

Forward: (1) per-chunk local states, (2) a sequential pass over chunks for the entering states,
(3) per-chunk outputs. Backward mirrors it: (1) each chunk's gradient into its entering state,
(2) a reverse pass giving G_{c+1} = dL/dS_{c+1}, (3) dx/dt/dB from a kernel over output rows
``i >= j`` and dC from one over ``j <= i``; the B and C kernels loop over the heads of a group
so the group-shared B and C gradients are summed in registers.

The gradient of the per-step log decays ``dA_t = dt_t A`` (``a`` is their within-chunk cumsum)
is summed from its terms, each computed once in float32::

    ddA_k =   sum_{j < k <= i} M_ji                   M_ji = (dy_i . x_j)(C_i . B_j) exp(a_i - a_j) dt_j
            + sum_{i >= k} dy_i . y_i^inter           y_i^inter = exp(a_i) C_i . S_c
            + sum_{j < k} e_j                         e_j = exp(a_Q - a_j) dt_j x_j . (G_{c+1} B_j)
            + exp(a_Q) <G_{c+1}, S_c>

(``exp(a_i - a_j)`` depends on ``dA_k`` for ``j < k <= i``; ``exp(a_i)`` and ``exp(a_Q)`` on every
``k`` up to ``i`` / the chunk's end). Since ``M`` is causal (``M_ji = 0`` for ``i < j``), its
rectangle sum is ``sum_{t<k} (source_t - target_t)`` with ``source_t = sum_i M_ti`` and
``target_t = sum_j M_jt``: the dx/dB kernel forms ``M`` in float32 from the two dot products it
already has and keeps both sums; ``_decay_grad_kernel`` adds the parts per chunk. The shorter
closed form ``dL/da_j = dy_j.y_j - u_j.du_j`` is the same sum in real numbers, but its two terms
came from different bf16-rounded dot products: large, nearly cancelling over a chunk, and no
longer equal after rounding, so the rounding swamped the result and the decay gradients of a
bf16 model were wrong by 40-140% (issue 16). Here source and target are sums of the very same
float32 ``M_ji``, so they cancel to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nemotron.kernels.dense import dense_inputs
from nemotron.kernels.ssd import DEFAULT_CHUNK_SIZE, check_ssd_shapes

__all__ = ["ssd_triton", "ssd_forward", "ssd_backward", "chunk_decays", "SSDDims", "SSD_TRITON_CONFIG"]

# Block sizes / warps; the benchmark may override these to sweep.
SSD_TRITON_CONFIG = {"block_rows": 64, "num_warps": 4, "num_stages": 2, "state_block": 512}


@triton.jit
def _mm(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _chunk_state_kernel(
    X, Y, DT, ACS, OUT,
    L, H, G, HPG, P, N, NC,
    sxb, sxl, sxh, sxp,
    syb, syl, syg, syn,
    Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    BACKWARD: tl.constexpr, IEEE: tl.constexpr,
):
    """OUT[b,c,h] = sum_j w_j X_j^T Y_j over chunk c.

    forward:  X = x, Y = B, w_j = dt_j exp(a_Q - a_j)   (the chunk's own state)
    backward: X = dy, Y = C, w_j = exp(a_j)              (dL/dS_c from this chunk's outputs)
    """
    c = tl.program_id(0).to(tl.int64)  # int64 rows: t * stride passes 2^31 past ~200K tokens
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    grp = h // HPG
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acs_base = ACS + bh * NC * Q + c * Q
    dt_base = DT + bh * NC * Q + c * Q
    a_last = tl.load(acs_base + Q - 1)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Q, BLOCK_K):
        t = c * Q + k0 + offs_k
        valid = t < L
        a_k = tl.load(acs_base + k0 + offs_k)
        if BACKWARD:
            w = tl.exp(a_k)
        else:
            w = tl.load(dt_base + k0 + offs_k) * tl.exp(a_last - a_k)
        w = tl.where(valid, w, 0.0)
        xk = tl.load(
            X + b * sxb + t[:, None] * sxl + h * sxh + offs_p[None, :] * sxp,
            mask=valid[:, None] & (offs_p[None, :] < P), other=0.0,
        )
        yk = tl.load(
            Y + b * syb + t[:, None] * syl + grp * syg + offs_n[None, :] * syn,
            mask=valid[:, None] & (offs_n[None, :] < N), other=0.0,
        )
        xw = (xk.to(tl.float32) * w[:, None]).to(yk.dtype)
        acc += _mm(tl.trans(xw), yk, IEEE)
    out = OUT + ((b * NC + c) * H + h) * P * N
    tl.store(out + offs_p[:, None] * N + offs_n[None, :], acc,
             mask=(offs_p[:, None] < P) & (offs_n[None, :] < N))


@triton.jit
def _state_pass_fwd_kernel(
    LOCAL, STATES, INIT, ACS, H, NC, PN,
    Q: tl.constexpr, BLOCK: tl.constexpr, HAS_INIT: tl.constexpr,
):
    """STATES[b, c] = state entering chunk c (c = 0..NC; STATES[b, NC] is the final state)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_INIT:
        s = tl.load(INIT + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(0, NC):
        tl.store(STATES + ((b * (NC + 1) + c) * H + h) * PN + offs, s, mask=mask)
        decay = tl.exp(tl.load(ACS + bh * NC * Q + c * Q + Q - 1))
        local = tl.load(LOCAL + ((b * NC + c) * H + h) * PN + offs, mask=mask, other=0.0)
        s = s * decay + local
    tl.store(STATES + ((b * (NC + 1) + NC) * H + h) * PN + offs, s, mask=mask)


@triton.jit
def _state_pass_bwd_kernel(
    DS, STATES, DFINAL, DINIT, ACS, DA_STATE, H, NC, PN,
    Q: tl.constexpr, BLOCK: tl.constexpr, HAS_DFINAL: tl.constexpr,
):
    """Reverse pass. In: DS[b,c] = dL/dS_c from chunk c's outputs. Out (in place): DS[b,c] = G_{c+1},
    the total gradient of the state leaving chunk c; DINIT = G_0; DA_STATE[b,h,c,block] =
    exp(a_Q) <G_{c+1}, S_c> over this program's block of the state (summed by the caller)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    blk = tl.program_id(1)
    nblk = tl.num_programs(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_DFINAL:
        g = tl.load(DFINAL + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.zeros((BLOCK,), dtype=tl.float32)
    for ci in range(0, NC):
        c = NC - 1 - ci
        ds_ptr = DS + ((b * NC + c) * H + h) * PN + offs
        ds = tl.load(ds_ptr, mask=mask, other=0.0)
        s_c = tl.load(STATES + ((b * (NC + 1) + c) * H + h) * PN + offs, mask=mask, other=0.0)
        decay = tl.exp(tl.load(ACS + bh * NC * Q + c * Q + Q - 1))
        tl.store(DA_STATE + (bh * NC + c) * nblk + blk, decay * tl.sum(g * s_c, axis=0))
        tl.store(ds_ptr, g, mask=mask)
        g = ds + decay * g
    tl.store(DINIT + bh * PN + offs, g, mask=mask)


@triton.jit
def _chunk_scan_fwd_kernel(
    X, DT, ACS, B, C, STATES, Y, DSKIP,
    L, H, G, HPG, P, N, NC,
    sxb, sxl, sxh, sxp,
    sbb, sbl, sbg, sbn,
    syb, syl, syh, syp,
    Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, HAS_D: tl.constexpr,
):
    """y rows of one chunk and head; with HAS_D the skip D[h] * x_i is added in fp32 before
    the single rounding to y's dtype (the mixer's D skip, fused)."""
    mb = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)  # int64 rows: t * stride passes 2^31 past ~200K tokens
    bh = tl.program_id(2).to(tl.int64)
    b = bh // H
    h = bh % H
    grp = h // HPG
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # row inside the chunk
    offs_k = tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    t_m = c * Q + offs_m
    valid_m = t_m < L
    acs_base = ACS + bh * NC * Q + c * Q
    a_m = tl.load(acs_base + offs_m)
    c_m = tl.load(C + b * sbb + t_m[:, None] * sbl + grp * sbg + offs_n[None, :] * sbn,
                  mask=valid_m[:, None] & (offs_n[None, :] < N), other=0.0)
    # Entering state, read transposed as [n, p].
    s_ptr = STATES + ((b * (NC + 1) + c) * H + h) * P * N
    s_t = tl.load(s_ptr + offs_n[:, None] + offs_p[None, :] * N,
                  mask=(offs_n[:, None] < N) & (offs_p[None, :] < P), other=0.0)
    acc = _mm(c_m, s_t.to(c_m.dtype), IEEE) * tl.exp(a_m)[:, None]
    for k0 in range(0, (mb + 1) * BLOCK_M, BLOCK_M):
        t_k = c * Q + k0 + offs_k
        valid_k = t_k < L
        a_k = tl.load(acs_base + k0 + offs_k)
        dt_k = tl.load(DT + bh * NC * Q + c * Q + k0 + offs_k)
        b_k = tl.load(B + b * sbb + t_k[:, None] * sbl + grp * sbg + offs_n[None, :] * sbn,
                      mask=valid_k[:, None] & (offs_n[None, :] < N), other=0.0)
        x_k = tl.load(X + b * sxb + t_k[:, None] * sxl + h * sxh + offs_p[None, :] * sxp,
                      mask=valid_k[:, None] & (offs_p[None, :] < P), other=0.0)
        cb = _mm(c_m, tl.trans(b_k), IEEE)
        causal = offs_m[:, None] >= (k0 + offs_k)[None, :]
        decay = tl.exp(tl.where(causal, a_m[:, None] - a_k[None, :], float("-inf")))
        w = cb * decay * dt_k[None, :]
        acc += _mm(w.to(x_k.dtype), x_k, IEEE)
    if HAS_D:
        x_m = tl.load(X + b * sxb + t_m[:, None] * sxl + h * sxh + offs_p[None, :] * sxp,
                      mask=valid_m[:, None] & (offs_p[None, :] < P), other=0.0)
        acc += x_m.to(tl.float32) * tl.load(DSKIP + h).to(tl.float32)
    tl.store(Y + b * syb + t_m[:, None] * syl + h * syh + offs_p[None, :] * syp,
             acc.to(Y.dtype.element_ty), mask=valid_m[:, None] & (offs_p[None, :] < P))


@triton.jit
def _bwd_dx_db_kernel(
    X, DT, ACS, B, C, DY, GSTATE, DX, DDT, DB, DSKIP, DD_PART, COLS, SOURCE,
    L, H, G, HPG, P, N, NC,
    sxb, sxl, sxh, sxp,
    sbb, sbl, sbg, sbn,
    sdyb, sdyl, sdyh, sdyp,
    Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, HAS_D: tl.constexpr,
):
    """Rows j of a chunk, one group: dx_j, ddt_j (direct part) for every head of the group, dB_j,
    and the decay gradient's per-position sums (module docstring): SOURCE[b, h, c*Q + j] =
    sum_i M_ji + e_j and COLS[b, h, row block, c*Q + i] = sum over this block's rows j of M_ji.
    DX has X's strides and DB has B's. With HAS_D
    (the fused D skip y += D x): dx_j += D dy_j and DD_PART[b, c, row block, h] = sum over the
    block's rows of dy_j . x_j (summed by the caller)."""
    jb = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)  # int64 rows: t * stride passes 2^31 past ~200K tokens
    bg = tl.program_id(2).to(tl.int64)
    b = bg // G
    grp = bg % G
    offs_j = jb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    t_j = c * Q + offs_j
    valid_j = t_j < L
    mask_jp = valid_j[:, None] & (offs_p[None, :] < P)
    mask_jn = valid_j[:, None] & (offs_n[None, :] < N)
    b_j = tl.load(B + b * sbb + t_j[:, None] * sbl + grp * sbg + offs_n[None, :] * sbn, mask=mask_jn, other=0.0)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for hh in range(0, HPG):
        h = grp * HPG + hh
        bh = b * H + h
        acs_base = ACS + bh * NC * Q + c * Q
        cols_base = COLS + (bh * (Q // BLOCK_M) + jb) * NC * Q + c * Q
        a_j = tl.load(acs_base + offs_j)
        a_last = tl.load(acs_base + Q - 1)
        dt_j = tl.load(DT + bh * NC * Q + c * Q + offs_j)
        x_j = tl.load(X + b * sxb + t_j[:, None] * sxl + h * sxh + offs_p[None, :] * sxp, mask=mask_jp, other=0.0)
        du = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        rows_m = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum over i of M_ji
        for i0 in range(jb * BLOCK_M, Q, BLOCK_M):
            t_i = c * Q + i0 + offs_i
            valid_i = t_i < L
            a_i = tl.load(acs_base + i0 + offs_i)
            c_i = tl.load(C + b * sbb + t_i[:, None] * sbl + grp * sbg + offs_n[None, :] * sbn,
                          mask=valid_i[:, None] & (offs_n[None, :] < N), other=0.0)
            dy_i = tl.load(DY + b * sdyb + t_i[:, None] * sdyl + h * sdyh + offs_p[None, :] * sdyp,
                           mask=valid_i[:, None] & (offs_p[None, :] < P), other=0.0)
            causal = (i0 + offs_i)[None, :] >= offs_j[:, None]
            decay = tl.exp(tl.where(causal, a_i[None, :] - a_j[:, None], float("-inf")))  # [j, i]
            cb = _mm(b_j, tl.trans(c_i), IEEE)  # B_j . C_i
            du += _mm((cb * decay).to(dy_i.dtype), dy_i, IEEE)
            s_t = _mm(x_j, tl.trans(dy_i), IEEE) * (decay * dt_j[:, None])  # u_j . dy_i exp(a_i - a_j)
            db_acc += _mm(s_t.to(c_i.dtype), c_i, IEEE)
            # The decay gradient inside the chunk, from M[j, i] = s_t * cb: its row sums (j the
            # source) here, its column sums (i the target) per row block for the caller to add.
            m = s_t * cb
            rows_m += tl.sum(m, axis=1)
            tl.store(cols_base + i0 + offs_i, tl.sum(m, axis=0))
        # Through the state leaving this chunk: G = dL/dS_{c+1}, [p, n].
        g_ptr = GSTATE + ((b * NC + c) * H + h) * P * N
        g_pn = tl.load(g_ptr + offs_p[:, None] * N + offs_n[None, :],
                       mask=(offs_p[:, None] < P) & (offs_n[None, :] < N), other=0.0)
        to_end = tl.exp(a_last - a_j)
        du_state = _mm(b_j, tl.trans(g_pn).to(b_j.dtype), IEEE) * to_end[:, None]
        db_acc += _mm(x_j, g_pn.to(x_j.dtype), IEEE) * (to_end * dt_j)[:, None]
        x_f = x_j.to(tl.float32)
        # e_j = dt_j x_j . du_state_j (0 past the sequence end, where dt and x are 0).
        tl.store(SOURCE + bh * NC * Q + c * Q + offs_j, rows_m + tl.sum(du_state * x_f, axis=1) * dt_j)
        du += du_state
        dx = du * dt_j[:, None]
        if HAS_D:
            dy_j = tl.load(DY + b * sdyb + t_j[:, None] * sdyl + h * sdyh + offs_p[None, :] * sdyp,
                           mask=mask_jp, other=0.0).to(tl.float32)
            dx += dy_j * tl.load(DSKIP + h).to(tl.float32)
            tl.store(DD_PART + ((b * NC + c) * tl.num_programs(0) + jb) * H + h, tl.sum(tl.sum(dy_j * x_f, axis=1), axis=0))
        tl.store(DX + b * sxb + t_j[:, None] * sxl + h * sxh + offs_p[None, :] * sxp,
                 dx.to(DX.dtype.element_ty), mask=mask_jp)
        # Unmasked: past the sequence end du and x are 0, so the padded tail gets its zeros here.
        tl.store(DDT + bh * NC * Q + c * Q + offs_j, tl.sum(du * x_f, axis=1))
    tl.store(DB + b * sbb + t_j[:, None] * sbl + grp * sbg + offs_n[None, :] * sbn,
             db_acc.to(DB.dtype.element_ty), mask=mask_jn)


@triton.jit
def _bwd_dc_kernel(
    X, DT, ACS, B, C, DY, STATES, DC, DYY_INTER,
    L, H, G, HPG, P, N, NC,
    sxb, sxl, sxh, sxp,
    sbb, sbl, sbg, sbn,
    sdyb, sdyl, sdyh, sdyp,
    Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Rows i of a chunk, one group: dC_i summed over the heads of the group, and per head
    dy_i . y_i^inter (the part of y_i from the entering state, = C_i . that part's share of dC_i)
    for the decay gradient."""
    ib = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)  # int64 rows: t * stride passes 2^31 past ~200K tokens
    bg = tl.program_id(2).to(tl.int64)
    b = bg // G
    grp = bg % G
    offs_i = ib * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    t_i = c * Q + offs_i
    valid_i = t_i < L
    dc_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c_i = tl.load(C + b * sbb + t_i[:, None] * sbl + grp * sbg + offs_n[None, :] * sbn,
                  mask=valid_i[:, None] & (offs_n[None, :] < N), other=0.0).to(tl.float32)
    for hh in range(0, HPG):
        h = grp * HPG + hh
        bh = b * H + h
        acs_base = ACS + bh * NC * Q + c * Q
        a_i = tl.load(acs_base + offs_i)
        dy_i = tl.load(DY + b * sdyb + t_i[:, None] * sdyl + h * sdyh + offs_p[None, :] * sdyp,
                       mask=valid_i[:, None] & (offs_p[None, :] < P), other=0.0)
        s_ptr = STATES + ((b * (NC + 1) + c) * H + h) * P * N
        s_pn = tl.load(s_ptr + offs_p[:, None] * N + offs_n[None, :],
                       mask=(offs_p[:, None] < P) & (offs_n[None, :] < N), other=0.0)
        head = _mm(dy_i, s_pn.to(dy_i.dtype), IEEE) * tl.exp(a_i)[:, None]
        tl.store(DYY_INTER + bh * NC * Q + c * Q + offs_i, tl.sum(head * c_i, axis=1))  # 0 past the end
        for j0 in range(0, (ib + 1) * BLOCK_M, BLOCK_M):
            t_j = c * Q + j0 + offs_j
            valid_j = t_j < L
            a_j = tl.load(acs_base + j0 + offs_j)
            dt_j = tl.load(DT + bh * NC * Q + c * Q + j0 + offs_j)
            x_j = tl.load(X + b * sxb + t_j[:, None] * sxl + h * sxh + offs_p[None, :] * sxp,
                          mask=valid_j[:, None] & (offs_p[None, :] < P), other=0.0)
            b_j = tl.load(B + b * sbb + t_j[:, None] * sbl + grp * sbg + offs_n[None, :] * sbn,
                          mask=valid_j[:, None] & (offs_n[None, :] < N), other=0.0)
            causal = offs_i[:, None] >= (j0 + offs_j)[None, :]
            decay = tl.exp(tl.where(causal, a_i[:, None] - a_j[None, :], float("-inf")))
            s = _mm(dy_i, tl.trans(x_j), IEEE) * (decay * dt_j[None, :])
            head += _mm(s.to(b_j.dtype), b_j, IEEE)
        dc_acc += head
    tl.store(DC + b * sbb + t_i[:, None] * sbl + grp * sbg + offs_n[None, :] * sbn,
             dc_acc.to(DC.dtype.element_ty), mask=valid_i[:, None] & (offs_n[None, :] < N))


@triton.jit
def _decay_grad_kernel(COLS, SOURCE, DYY_INTER, DA_STATE, DDA, NC, NSB,
                       Q: tl.constexpr, NRB: tl.constexpr, BLOCK_S: tl.constexpr):
    """ddA for one chunk of one (batch, head) from its per-position sums (module docstring):
    ddA_k = sum_{t<k} (source_t - target_t) + sum_{i>=k} dy_i.y_i^inter + exp(a_Q) <G, S_c>,
    source_t = sum_i M_ti + e_t and target_t = sum_j M_jt (summed over the NRB row blocks)."""
    c = tl.program_id(0).to(tl.int64)  # int64 rows: t * stride passes 2^31 past ~200K tokens
    bh = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, Q)
    base = bh * NC * Q + c * Q + offs
    target = tl.zeros((Q,), dtype=tl.float32)
    for rb in range(0, NRB):
        target += tl.load(COLS + (bh * NRB + rb) * NC * Q + c * Q + offs)
    net = tl.load(SOURCE + base) - target
    g = tl.cumsum(net, axis=0) - net
    g += tl.cumsum(tl.load(DYY_INTER + base), axis=0, reverse=True)
    offs_s = tl.arange(0, BLOCK_S)
    g += tl.sum(tl.load(DA_STATE + (bh * NC + c) * NSB + offs_s, mask=offs_s < NSB, other=0.0), axis=0)
    tl.store(DDA + base, g)


def _pow2(v: int) -> int:
    return max(16, triton.next_power_of_2(v))


class SSDDims:
    """Sizes, block sizes and the dot precision of one SSD call."""

    def __init__(self, x, B, chunk_size):
        self.b, self.l, self.h, self.p = x.shape
        self.g, self.n = B.shape[2], B.shape[3]
        self.hpg = self.h // self.g
        self.Q = chunk_size
        self.nc = max(1, -(-self.l // chunk_size))
        self.block_p = _pow2(self.p)
        self.block_n = _pow2(self.n)
        self.block_m = min(chunk_size, SSD_TRITON_CONFIG["block_rows"])
        # float32 inputs: exact fp32 dots unless the user allowed TF32 for matmuls (as PyTorch does).
        self.ieee = x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def ssd_forward(x, dt_p, acs, B, C, init, d: SSDDims, D=None):
    """Launch the forward kernels. x [b,l,h,p], B/C [b,l,g,n] may be strided views (last dim
    contiguous; B and C with equal strides); ``D`` [h] fuses the skip ``y += D x``. Returns y
    (contiguous, x's dtype) and the entering states [b, nc+1, h, p, n] (fp32)."""
    if B.stride() != C.stride():
        raise ValueError(f"ssd_forward: B and C must have equal strides, got {B.stride()} and {C.stride()}")
    dev = x.device
    pn = d.p * d.n
    warps, stages = SSD_TRITON_CONFIG["num_warps"], SSD_TRITON_CONFIG["num_stages"]
    local = torch.empty((d.b, d.nc, d.h, d.p, d.n), device=dev, dtype=torch.float32)
    _chunk_state_kernel[(d.nc, d.b * d.h)](
        x, B, dt_p, acs, local,
        d.l, d.h, d.g, d.hpg, d.p, d.n, d.nc,
        *x.stride(), *B.stride(),
        Q=d.Q, BLOCK_K=d.block_m, BLOCK_P=d.block_p, BLOCK_N=d.block_n,
        BACKWARD=False, IEEE=d.ieee, num_warps=warps, num_stages=stages,
    )
    states = torch.empty((d.b, d.nc + 1, d.h, d.p, d.n), device=dev, dtype=torch.float32)
    sblock = min(SSD_TRITON_CONFIG["state_block"], triton.next_power_of_2(pn))
    _state_pass_fwd_kernel[(d.b * d.h, triton.cdiv(pn, sblock))](
        local, states, init if init is not None else local, acs, d.h, d.nc, pn,
        Q=d.Q, BLOCK=sblock, HAS_INIT=init is not None,
    )
    y = torch.empty((d.b, d.l, d.h, d.p), device=dev, dtype=x.dtype)
    _chunk_scan_fwd_kernel[(triton.cdiv(d.Q, d.block_m), d.nc, d.b * d.h)](
        x, dt_p, acs, B, C, states, y, D if D is not None else acs,
        d.l, d.h, d.g, d.hpg, d.p, d.n, d.nc,
        *x.stride(), *B.stride(), *y.stride(),
        Q=d.Q, BLOCK_M=d.block_m, BLOCK_P=d.block_p, BLOCK_N=d.block_n,
        IEEE=d.ieee, HAS_D=D is not None, num_warps=warps, num_stages=stages,
    )
    return y, states


def ssd_backward(x, dt_p, acs, B, C, states, dy, dfinal, d: SSDDims, *, D=None, dx=None, dB=None, dC=None):
    """Launch the backward kernels; returns ``(dx, ddt, ddA, dB, dC, dinit, dD)``.

    ``ddt`` [b, h, nc*Q] is the direct gradient of ``dt`` (through ``u = dt x``); ``ddA`` [b, h, nc*Q]
    the gradient of the per-step log decays ``dA_t = dt_t A`` (module docstring), so that the total
    gradients are ``ddt + A ddA`` for dt and ``sum dt ddA`` for A. Both are float32.

    ``dy`` may have any strides (last dim contiguous). ``dx`` / ``dB`` / ``dC``, when given, are
    written in place and must have x's / B's / C's strides (slices of one gradient buffer laid out
    like the x|B|C buffer); by default they are allocated. ``D`` given: the fused skip's gradients
    (``dx += D dy``, ``dD`` in float32); else ``dD`` is None. ``dinit`` is float32."""
    dev = x.device
    pn = d.p * d.n
    warps, stages = SSD_TRITON_CONFIG["num_warps"], SSD_TRITON_CONFIG["num_stages"]
    f32 = dict(device=dev, dtype=torch.float32)
    # (1) each chunk's outputs -> gradient of the state entering it
    dstate = torch.empty((d.b, d.nc, d.h, d.p, d.n), **f32)
    _chunk_state_kernel[(d.nc, d.b * d.h)](
        dy, C, dt_p, acs, dstate,
        d.l, d.h, d.g, d.hpg, d.p, d.n, d.nc,
        *dy.stride(), *C.stride(),
        Q=d.Q, BLOCK_K=d.block_m, BLOCK_P=d.block_p, BLOCK_N=d.block_n,
        BACKWARD=True, IEEE=d.ieee, num_warps=warps, num_stages=stages,
    )
    # (2) reverse pass over chunks
    dinit = torch.empty((d.b, d.h, d.p, d.n), **f32)
    dfinal_c = dfinal.contiguous() if dfinal is not None else None
    sblock = min(SSD_TRITON_CONFIG["state_block"], triton.next_power_of_2(pn))
    nsb = triton.cdiv(pn, sblock)
    da_state = torch.empty((d.b, d.h, d.nc, nsb), **f32)
    _state_pass_bwd_kernel[(d.b * d.h, nsb)](
        dstate, states, dfinal_c if dfinal_c is not None else dinit, dinit, acs, da_state,
        d.h, d.nc, pn, Q=d.Q, BLOCK=sblock, HAS_DFINAL=dfinal_c is not None,
    )
    # (3) dx, ddt (direct), dB and the decay gradient's inner parts ; dC and dy.y^inter
    if dx is None:
        dx = torch.empty_like(x)
    if dB is None:
        dB = torch.empty_like(B)
    if dC is None:
        dC = torch.empty_like(C)
    if dx.stride() != x.stride() or dB.stride() != B.stride() or dC.stride() != C.stride():
        raise ValueError("ssd_backward: dx, dB, dC must have the strides of x, B, C")
    ddt = torch.empty((d.b, d.h, d.nc * d.Q), **f32)
    row_blocks = triton.cdiv(d.Q, d.block_m)
    grid = (row_blocks, d.nc, d.b * d.g)
    dd_part = torch.empty((d.b, d.nc, grid[0], d.h), **f32) if D is not None else ddt
    # Row block jb writes the column sums of the i of blocks >= jb only: the rest must read as zero.
    cols = torch.zeros((d.b, d.h, row_blocks, d.nc * d.Q), **f32)
    source = torch.empty((d.b, d.h, d.nc * d.Q), **f32)
    _bwd_dx_db_kernel[grid](
        x, dt_p, acs, B, C, dy, dstate, dx, ddt, dB, D if D is not None else ddt, dd_part, cols, source,
        d.l, d.h, d.g, d.hpg, d.p, d.n, d.nc,
        *x.stride(), *B.stride(), *dy.stride(),
        Q=d.Q, BLOCK_M=d.block_m, BLOCK_P=d.block_p, BLOCK_N=d.block_n,
        IEEE=d.ieee, HAS_D=D is not None, num_warps=warps, num_stages=stages,
    )
    dyy_inter = torch.empty((d.b, d.h, d.nc * d.Q), **f32)
    _bwd_dc_kernel[grid](
        x, dt_p, acs, B, C, dy, states, dC, dyy_inter,
        d.l, d.h, d.g, d.hpg, d.p, d.n, d.nc,
        *x.stride(), *B.stride(), *dy.stride(),
        Q=d.Q, BLOCK_M=d.block_m, BLOCK_P=d.block_p, BLOCK_N=d.block_n,
        IEEE=d.ieee, num_warps=warps, num_stages=stages,
    )
    # (4) the decay gradient from its parts, per chunk
    dda = torch.empty((d.b, d.h, d.nc * d.Q), **f32)
    _decay_grad_kernel[(d.nc, d.b * d.h)](
        cols, source, dyy_inter, da_state, dda, d.nc, nsb,
        Q=d.Q, NRB=row_blocks, BLOCK_S=triton.next_power_of_2(nsb),
    )
    dD = dd_part.sum((0, 1, 2)) if D is not None else None
    return dx, ddt, dda, dB, dC, dinit, dD


def chunk_decays(dt_p: torch.Tensor, A: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The within-chunk cumulative log decays ``cumsum(dt * A)`` [b, h, nc*Q] (float32) of
    ``dt_p`` [b, h, nc*Q] (the kernels' layout) and ``A`` [h]."""
    b, h, lp = dt_p.shape
    dA = dt_p * A.float()[None, :, None]
    return dA.view(b, h, lp // chunk_size, chunk_size).cumsum(-1).view(b, h, lp).contiguous()


class _SSDFunction(torch.autograd.Function):
    @staticmethod
    @dense_inputs
    def forward(ctx, x, dt_p, A, B, C, init, chunk_size):
        x, B, C = x.contiguous(), B.contiguous(), C.contiguous()
        d = SSDDims(x, B, chunk_size)
        acs = chunk_decays(dt_p, A, chunk_size)
        init_c = init.contiguous() if init is not None else None
        y, states = ssd_forward(x, dt_p, acs, B, C, init_c, d)
        final = states[:, d.nc].clone()
        ctx.save_for_backward(x, dt_p, A, acs, B, C, states)
        ctx.dims = d
        ctx.has_init = init is not None
        ctx.init_dtype = init.dtype if init is not None else None
        return y, final

    @staticmethod
    @dense_inputs
    def backward(ctx, dy, dfinal):
        x, dt_p, A, acs, B, C, states = ctx.saved_tensors
        d: SSDDims = ctx.dims
        if dy is None:
            dy = torch.zeros_like(x)
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx, ddt, dda, dB, dC, dinit, _ = ssd_backward(x, dt_p, acs, B, C, states, dy, dfinal, d)
        # dA_t = dt_t A: dt gets A ddA on top of its direct gradient, A gets sum dt ddA.
        ddt_total = torch.addcmul(ddt, dda, A.float()[None, :, None])
        dA = (dda * dt_p).sum((0, 2)).to(A.dtype)
        dinit_out = dinit.to(ctx.init_dtype) if ctx.has_init else None
        return dx, ddt_total, dA, dB, dC, dinit_out, None


def ssd_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton SSD scan; same contract as ``ssd_chunked_reference`` (final_state in float32).

    ``chunk_size`` must be a power of two >= 16 (tensor-core tile constraints). Dots run on the
    input dtype with float32 accumulation; float32 inputs use exact fp32 dots unless
    ``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32, ~1e-3 relative error).
    """
    b, l, h, p, g, n = check_ssd_shapes(x, dt, A, B, C, initial_state)
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"ssd_triton: chunk_size must be a power of two >= 16, got {chunk_size}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"ssd_triton: x must be float32/bfloat16/float16, got {x.dtype}")
    if B.dtype != x.dtype or C.dtype != x.dtype:
        raise TypeError(f"ssd_triton: B and C must have x's dtype {x.dtype}, got {B.dtype}, {C.dtype}")
    nc = max(1, -(-l // chunk_size))
    pad = nc * chunk_size - l
    # dt in the kernels' [b, h, nc*Q] layout, zero-padded (no decay, no input past the end).
    dt_p = F.pad(dt.float().transpose(1, 2), (0, pad)).contiguous()
    return _SSDFunction.apply(x, dt_p, A, B, C, initial_state, chunk_size)
