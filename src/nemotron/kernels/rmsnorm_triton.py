"""Triton kernels for (gated, grouped) RMSNorm; see ``nemotron.kernels.rmsnorm`` for the maths.

One program handles a tile of ``BLOCK_T`` tokens x one group of channels; the backward writes
per-tile partial weight gradients that a final sum reduces (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nemotron.kernels.dense import dense_inputs

__all__ = ["GatedRMSNormFunction", "gated_rmsnorm_forward", "gated_rmsnorm_backward", "RMSNORM_TRITON_CONFIG"]


@triton.jit
def _fwd_kernel(Y, Z, W, OUT, RSTD, T, D, GS, eps, szt,
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
        z = tl.load(Z + rows[:, None] * szt + grp * GS + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = h * z * tl.sigmoid(z)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / GS + eps)
    w = tl.load(W + grp * GS + cols, mask=cols < GS, other=0.0)
    normed = (h * rstd[:, None]).to(OUT.dtype.element_ty)
    tl.store(OUT + offs, normed * w[None, :].to(OUT.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows * (D // GS) + grp, rstd, mask=rows < T)


@triton.jit
def _bwd_kernel(Y, Z, W, DOUT, RSTD, DY, DZ, DW_PART, T, D, GS, szt, sdzt,
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
        z = tl.load(Z + rows[:, None] * szt + grp * GS + cols[None, :], mask=mask, other=0.0).to(tl.float32)
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
        tl.store(DZ + rows[:, None] * sdzt + grp * GS + cols[None, :], (dh * y * dsilu).to(DZ.dtype.element_ty), mask=mask)
    else:
        tl.store(DY + offs, dh.to(DY.dtype.element_ty), mask=mask)


# Elements per program and warps; the benchmark may override these to sweep.
RMSNORM_TRITON_CONFIG = {"elements_per_program": 8192, "num_warps": 4}


def _tiles(group_size: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(group_size)
    block_t = max(1, min(64, RMSNORM_TRITON_CONFIG["elements_per_program"] // block_c))
    return block_t, block_c


def _rows(t: torch.Tensor | None, d: int) -> torch.Tensor | None:
    """[..., d] -> [T, d] with a contiguous last dim; a row-strided view (the gate sliced out of
    the in-projection output) stays a view."""
    if t is None:
        return None
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def gated_rmsnorm_forward(y2, z2, weight, group_size, eps):
    """y2 [T, d] contiguous, z2 [T, d] row-strided or None -> (out [T, d] in y's dtype, rstd [T, groups])."""
    t, d = y2.shape
    groups = d // group_size
    out = torch.empty_like(y2)
    rstd = torch.empty((t, groups), device=y2.device, dtype=torch.float32)
    block_t, block_c = _tiles(group_size)
    _fwd_kernel[(triton.cdiv(t, block_t), groups)](
        y2, z2 if z2 is not None else y2, weight, out, rstd, t, d, group_size, eps,
        z2.stride(0) if z2 is not None else d,
        HAS_GATE=z2 is not None, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=RMSNORM_TRITON_CONFIG["num_warps"],
    )
    return out, rstd


def gated_rmsnorm_backward(y2, z2, weight, rstd, dout2, group_size, dz=None):
    """Gradients (dy [T, d] contiguous, dz, dweight in weight's dtype). ``dz``, when given, is a
    row-strided [T, d] view written in place (a slice of the in-projection's gradient)."""
    t, d = y2.shape
    block_t, block_c = _tiles(group_size)
    n_tiles = triton.cdiv(t, block_t)
    dy = torch.empty_like(y2)
    if z2 is not None and dz is None:
        dz = torch.empty((t, d), device=y2.device, dtype=z2.dtype)
    dw_part = torch.empty((n_tiles, d), device=y2.device, dtype=torch.float32)
    _bwd_kernel[(n_tiles, d // group_size)](
        y2, z2 if z2 is not None else y2, weight, dout2, rstd, dy, dz if dz is not None else dy, dw_part,
        t, d, group_size, z2.stride(0) if z2 is not None else d, dz.stride(0) if dz is not None else d,
        HAS_GATE=z2 is not None, BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=RMSNORM_TRITON_CONFIG["num_warps"],
    )
    return dy, dz, dw_part.sum(0).to(weight.dtype)


class GatedRMSNormFunction(torch.autograd.Function):
    @staticmethod
    @dense_inputs
    def forward(ctx, y, z, weight, group_size, eps):
        d = y.shape[-1]
        y2 = y.reshape(-1, d).contiguous()
        z2 = _rows(z, d)
        out, rstd = gated_rmsnorm_forward(y2, z2, weight, group_size, eps)
        ctx.save_for_backward(y2, z2, weight, rstd)
        ctx.group_size = group_size
        ctx.shape = y.shape
        return out.reshape(y.shape)

    @staticmethod
    @dense_inputs
    def backward(ctx, dout):
        y2, z2, weight, rstd = ctx.saved_tensors
        dout2 = dout.reshape(-1, y2.shape[1]).contiguous()
        dy, dz, dw = gated_rmsnorm_backward(y2, z2, weight, rstd, dout2, ctx.group_size)
        dz_out = dz.reshape(ctx.shape) if dz is not None else None
        return dy.reshape(ctx.shape), dz_out, dw, None, None
