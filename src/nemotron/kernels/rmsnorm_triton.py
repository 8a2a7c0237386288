"""Triton kernels for (gated, grouped) RMSNorm; see ``nemotron.kernels.rmsnorm`` for the maths.

One program handles a tile of ``BLOCK_T`` tokens x one group of channels; the backward writes
per-tile partial weight gradients that a final sum reduces (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["GatedRMSNormFunction", "RMSNORM_TRITON_CONFIG"]


@triton.jit
def _fwd_kernel(Y, Z, W, OUT, RSTD, T, D, GS, eps,
                HAS_GATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    # Token tiles on grid axis 0 (up to 2^31 - 1 programs; axis 1 stops at 65535, which a
    # 128K-token sequence with small tiles exceeds).
    grp = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < T) & (cols[None, :] < GS)
    offs = rows[:, None] * D + grp * GS + cols[None, :]
    h = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
        h = h * z * tl.sigmoid(z)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / GS + eps)
    w = tl.load(W + grp * GS + cols, mask=cols < GS, other=0.0)
    normed = (h * rstd[:, None]).to(OUT.dtype.element_ty)
    tl.store(OUT + offs, normed * w[None, :].to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows * (D // GS) + grp, rstd, mask=rows < T)


@triton.jit
def _bwd_kernel(Y, Z, W, DOUT, RSTD, DY, DZ, DW_PART, T, D, GS,
                HAS_GATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    grp = tl.program_id(1)
    tile = tl.program_id(0).to(tl.int64)
    rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < T) & (cols[None, :] < GS)
    offs = rows[:, None] * D + grp * GS + cols[None, :]
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    h = y
    if HAS_GATE:
        z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        h = y * z * sig
    rstd = tl.load(RSTD + rows * (D // GS) + grp, mask=rows < T, other=0.0)
    normed = h * rstd[:, None]
    w = tl.load(W + grp * GS + cols, mask=cols < GS, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    # The forward rounds the normalised value to the output dtype before the weight multiply.
    normed_rounded = normed.to(DOUT.dtype.element_ty).to(tl.float32)
    tl.store(DW_PART + tile * D + grp * GS + cols, tl.sum(dout * normed_rounded, axis=0), mask=cols < GS)
    dnormed = dout * w[None, :]
    dh = rstd[:, None] * (dnormed - normed * (tl.sum(dnormed * normed, axis=1) / GS)[:, None])
    if HAS_GATE:
        tl.store(DY + offs, (dh * z * sig).to(DY.dtype.element_ty), mask=mask)
        dsilu = sig * (1.0 + z * (1.0 - sig))
        tl.store(DZ + offs, (dh * y * dsilu).to(DZ.dtype.element_ty), mask=mask)
    else:
        tl.store(DY + offs, dh.to(DY.dtype.element_ty), mask=mask)


# Elements per program and warps; the benchmark may override these to sweep.
RMSNORM_TRITON_CONFIG = {"elements_per_program": 8192, "num_warps": 4}


def _tiles(group_size: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(group_size)
    block_t = max(1, min(64, RMSNORM_TRITON_CONFIG["elements_per_program"] // block_c))
    return block_t, block_c


class GatedRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, group_size, eps):
        shape = y.shape
        d = shape[-1]
        y2 = y.reshape(-1, d).contiguous()
        z2 = z.reshape(-1, d).contiguous() if z is not None else None
        t = y2.shape[0]
        groups = d // group_size
        out = torch.empty_like(y2)
        rstd = torch.empty((t, groups), device=y.device, dtype=torch.float32)
        block_t, block_c = _tiles(group_size)
        _fwd_kernel[(triton.cdiv(t, block_t), groups)](
            y2, z2 if z2 is not None else y2, weight, out, rstd, t, d, group_size, eps,
            HAS_GATE=z is not None, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=RMSNORM_TRITON_CONFIG["num_warps"],
        )
        ctx.save_for_backward(y2, z2, weight, rstd)
        ctx.group_size = group_size
        ctx.shape = shape
        return out.reshape(shape)

    @staticmethod
    def backward(ctx, dout):
        y2, z2, weight, rstd = ctx.saved_tensors
        t, d = y2.shape
        gs = ctx.group_size
        block_t, block_c = _tiles(gs)
        n_tiles = triton.cdiv(t, block_t)
        dout2 = dout.reshape(-1, d).contiguous()
        dy = torch.empty_like(y2)
        dz = torch.empty_like(z2) if z2 is not None else None
        dw_part = torch.empty((n_tiles, d), device=y2.device, dtype=torch.float32)
        _bwd_kernel[(n_tiles, d // gs)](
            y2, z2 if z2 is not None else y2, weight, dout2, rstd, dy, dz if dz is not None else dy, dw_part,
            t, d, gs, HAS_GATE=z2 is not None, BLOCK_T=block_t, BLOCK_C=block_c,
            num_warps=RMSNORM_TRITON_CONFIG["num_warps"],
        )
        dw = dw_part.sum(0).to(weight.dtype)
        dz_out = dz.reshape(ctx.shape) if dz is not None else None
        return dy.reshape(ctx.shape), dz_out, dw, None, None
