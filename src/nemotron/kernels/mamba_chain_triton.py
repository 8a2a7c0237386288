"""The fused Mamba-2 chain (conv -> SSD + D skip -> gated norm) as one autograd Function; see
``nemotron.kernels.mamba_chain`` for the maths and the dispatch.

What this saves against the step-by-step fast path (one autograd node per op):

- forward: the SSD reads x, B, C where the conv wrote them (strided views of one buffer) instead
  of three contiguous copies; the D skip is added inside the SSD output kernel (no fp32 upcasts,
  multiply, add and downcast over [tokens, d_inner]); the norm reads the gate z in place in the
  in-projection output instead of a contiguous copy.
- backward: one ``d(zxbcdt)`` buffer is allocated; the norm writes dz, the conv writes d(xBC)
  into their slices of it, and the SSD writes dx, dB, dC into slices of one d(xBC-after-conv)
  buffer, so autograd never concatenates split gradients; the D skip's ``dx += D dy`` and ``dD``
  come out of the SSD dx kernel.

The dt path (``softplus(dt_raw + dt_bias)``, clamp, the per-chunk cumulative decays
``cumsum(dt * A)``) is one small kernel each way on [batch, heads, seq] values, in place of
some 30 launch-bound PyTorch ops: the forward reads dt_raw where it lies in zxbcdt and writes
dt and the decays in the SSD kernels' [b, h, chunks * Q] layout; the backward takes the SSD's dt
and log-decay gradients to d(dt_raw), written into its slice of
d(zxbcdt), and per-chunk partial sums of dA and d(dt_bias).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nemotron.kernels.conv1d_triton import conv1d_backward, conv1d_forward
from nemotron.kernels.dense import dense_inputs
from nemotron.kernels.mamba_chain import MambaChainShape
from nemotron.kernels.rmsnorm_triton import gated_rmsnorm_backward, gated_rmsnorm_forward
from nemotron.kernels.ssd_triton import SSDDims, ssd_backward, ssd_forward

__all__ = ["MambaChainFunction", "mamba_chain_triton"]


def _split_xbc(xbc: torch.Tensor, shape: MambaChainShape):
    """[b, s, conv_dim] -> views x [b, s, h, p], B and C [b, s, g, n] (no copies)."""
    b, s, _ = xbc.shape
    di, gn = shape.d_inner, shape.num_groups * shape.state_size
    x = xbc[..., :di].view(b, s, shape.num_heads, shape.head_dim)
    B = xbc[..., di:di + gn].view(b, s, shape.num_groups, shape.state_size)
    C = xbc[..., di + gn:].view(b, s, shape.num_groups, shape.state_size)
    return x, B, C


@triton.jit
def _softplus(pre):
    """torch's softplus (threshold 20): log1p(e), e = exp(pre), to float32 rounding.

    ``log(1 + e)`` lost e's low bits when 1 + e was rounded: 14% too large or small at pre = -14,
    0.7% at -10, 1e-4 at -6 (dt ~ 2.5e-3, Megatron's initial range is 1e-3..0.1), where
    torch.softplus is exact to float32 rounding. Small e (pre < -2.77) takes log1p's series to
    e^6 (relative error below e^6 / 7 < 1e-8); larger e the log of the rounded 1 + e, corrected
    by e / ((1 + e) - 1), the ratio that rounding changed (Goldberg's log1p)."""
    e = tl.exp(tl.minimum(pre, 20.0, propagate_nan=tl.PropagateNan.ALL))  # NaN stays NaN, as in torch
    series = e * (1.0 - e * (0.5 - e * (1.0 / 3.0 - e * (0.25 - e * (0.2 - e * (1.0 / 6.0))))))
    u = 1.0 + e
    corrected = tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0))
    return tl.where(pre > 20.0, pre, tl.where(e < 0.0625, series, corrected))


@triton.jit
def _dt_chunk(RAW, BIAS, ALOG, L, H, NC, srb, srl, Q: tl.constexpr):
    """This program's (chunk, batch x head): its rows' validity, raw + bias in fp32, A = -exp(A_log)
    and the offsets of its Q entries in the [b, h, NC * Q] dt / decay buffers."""
    c = tl.program_id(0).to(tl.int64)  # int64 rows: t * stride passes 2^31 past ~200K tokens
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs = tl.arange(0, Q)
    t = c * Q + offs
    valid = t < L
    pre = tl.load(RAW + b * srb + t * srl + h, mask=valid, other=0.0).to(tl.float32) + tl.load(BIAS + h).to(tl.float32)
    a = -tl.exp(tl.load(ALOG + h).to(tl.float32))
    base = bh * NC * Q + c * Q + offs
    return c, bh, b, h, offs, t, valid, pre, a, base


@triton.jit
def _dt_fwd_kernel(RAW, BIAS, ALOG, DT, ACS, L, H, NC, srb, srl, lo, hi, Q: tl.constexpr):
    """One chunk of one (batch, head): dt = clamp(softplus(raw + bias)) (0 past the end) and the
    within-chunk cumulative log decays cumsum(dt * A), A = -exp(A_log), both [b, h, NC * Q]."""
    c, bh, b, h, offs, t, valid, pre, a, base = _dt_chunk(RAW, BIAS, ALOG, L, H, NC, srb, srl, Q)
    # NaN propagates (torch's softplus and clamp keep it): a NaN dt_raw was clamped to lo or hi,
    # or became dt = 20, so a diverged in-projection gave finite outputs here only
    dt = tl.minimum(tl.maximum(_softplus(pre), lo, propagate_nan=tl.PropagateNan.ALL), hi,
                    propagate_nan=tl.PropagateNan.ALL)
    dt = tl.where(valid, dt, 0.0)
    tl.store(DT + base, dt)
    tl.store(ACS + base, tl.cumsum(dt * a, axis=0))


@triton.jit
def _dt_bwd_kernel(RAW, BIAS, ALOG, DT, DDT, DDA, DRAW, DA_PART, DBIAS_PART, L, H, NC, srb, srl,
                   sdb, sdl, lo, hi, Q: tl.constexpr):
    """The dt path's backward for one chunk of one (batch, head): from the SSD's direct dt
    gradient and its log-decay gradient ddA (``dA_t = dt_t A``) to d(raw) (written into its slice
    of d(zxbcdt)) and this chunk's partial sums of dA and d(bias)."""
    c, bh, b, h, offs, t, valid, pre, a, base = _dt_chunk(RAW, BIAS, ALOG, L, H, NC, srb, srl, Q)
    sp = _softplus(pre)
    dt = tl.load(DT + base)
    dda = tl.load(DDA + base)
    ddt = tl.load(DDT + base) + dda * a
    keep = valid & (sp >= lo) & (sp <= hi)  # clamp passes the gradient inside [lo, hi], as torch's
    dpre = tl.where(keep, ddt * tl.where(pre > 20.0, 1.0, tl.sigmoid(pre)), 0.0)
    # torch: the clamp passes 0 for a NaN input, softplus' backward makes it 0 * NaN = NaN
    dpre = tl.where(valid & (pre != pre), float("nan"), dpre)
    tl.store(DRAW + b * sdb + t * sdl + h, dpre.to(DRAW.dtype.element_ty), mask=valid)
    tl.store(DA_PART + bh * NC + c, tl.sum(tl.where(valid, dda * dt, 0.0), axis=0))
    tl.store(DBIAS_PART + bh * NC + c, tl.sum(dpre, axis=0))


def _dt_forward(raw, dt_bias, A_log, shape: MambaChainShape):
    """raw [b, s, h] (a strided slice) -> dt, acs [b, h, NC * Q] float32 (the SSD kernels' layout)."""
    b, s, h = raw.shape
    q = shape.chunk_size
    nc = max(1, -(-s // q))
    dt = torch.empty((b, h, nc * q), device=raw.device, dtype=torch.float32)
    acs = torch.empty_like(dt)
    lo, hi = shape.dt_limit
    _dt_fwd_kernel[(nc, b * h)](raw, dt_bias, A_log, dt, acs, s, h, nc, raw.stride(0), raw.stride(1),
                                float(lo), float(hi), Q=q)
    return dt, acs


def _dt_backward(raw, dt_bias, A_log, dt, ddt, dda, draw, shape: MambaChainShape):
    """Writes d(raw) into ``draw`` (a strided slice); returns (d dt_bias, d A_log) in the parameters' dtypes."""
    b, s, h = raw.shape
    q = shape.chunk_size
    nc = dt.shape[-1] // q
    da_part = torch.empty((b, h, nc), device=raw.device, dtype=torch.float32)
    dbias_part = torch.empty_like(da_part)
    lo, hi = shape.dt_limit
    _dt_bwd_kernel[(nc, b * h)](raw, dt_bias, A_log, dt, ddt, dda, draw, da_part, dbias_part, s, h, nc,
                                raw.stride(0), raw.stride(1), draw.stride(0), draw.stride(1),
                                float(lo), float(hi), Q=q)
    A = -torch.exp(A_log.float())
    dA_log = da_part.sum((0, 2)) * A  # A = -exp(A_log): dA/dA_log = A
    return dbias_part.sum((0, 2)).to(dt_bias.dtype), dA_log.to(A_log.dtype)


class MambaChainFunction(torch.autograd.Function):
    @staticmethod
    @dense_inputs
    def forward(ctx, zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight,
                shape: MambaChainShape, conv_dtype: torch.dtype):
        if zxbcdt.stride(-1) != 1:
            zxbcdt = zxbcdt.contiguous()
        b, s, _ = zxbcdt.shape
        di, cd = shape.d_inner, shape.conv_dim
        z = zxbcdt[..., :di]
        w = conv_weight.reshape(cd, -1).contiguous()
        xbc = conv1d_forward(zxbcdt[..., di:di + cd], w, conv_bias, True, conv_dtype)
        x, B, C = _split_xbc(xbc, shape)
        dt_p, acs = _dt_forward(zxbcdt[..., di + cd:], dt_bias, A_log, shape)
        dims = SSDDims(x, B, shape.chunk_size)
        y, states = ssd_forward(x, dt_p, acs, B, C, None, dims, D=D)
        out, rstd = gated_rmsnorm_forward(y.view(b * s, di), z.reshape(b * s, di), norm_weight,
                                          di // shape.num_groups, shape.eps)
        ctx.save_for_backward(zxbcdt, conv_weight, w, conv_bias, dt_bias, A_log, D, norm_weight,
                              xbc, dt_p, acs, states, y, rstd)
        ctx.shape, ctx.dims = shape, dims
        return out.view(b, s, di)

    @staticmethod
    @dense_inputs
    def backward(ctx, dout):
        (zxbcdt, conv_weight, w, conv_bias, dt_bias, A_log, D, norm_weight,
         xbc, dt_p, acs, states, y, rstd) = ctx.saved_tensors
        shape: MambaChainShape = ctx.shape
        b, s, _ = zxbcdt.shape
        di, cd = shape.d_inner, shape.conv_dim
        dzxbcdt = torch.empty((b, s, shape.in_proj_dim), device=zxbcdt.device, dtype=zxbcdt.dtype)

        # Gated norm: dz straight into its slice of d(zxbcdt).
        dout2 = dout.reshape(b * s, di)
        if not dout2.is_contiguous():
            dout2 = dout2.contiguous()
        dy, _, dnorm_weight = gated_rmsnorm_backward(
            y.view(b * s, di), zxbcdt[..., :di].reshape(b * s, di), norm_weight, rstd, dout2,
            di // shape.num_groups, dz=dzxbcdt[..., :di].view(b * s, di),
        )

        # SSD + D skip: dx, dB, dC into slices of one buffer laid out like the conv output.
        x, B, C = _split_xbc(xbc, shape)
        dxbc = torch.empty_like(xbc)
        dx, dB, dC = _split_xbc(dxbc, shape)
        _, ddt, dda, _, _, _, dD = ssd_backward(
            x, dt_p, acs, B, C, states, dy.view(x.shape), None, ctx.dims, D=D, dx=dx, dB=dB, dC=dC,
        )
        del dy, dx, dB, dC  # free d(y) before the conv backward's fp32 buffer is allocated

        # Conv + SiLU: d(xBC) straight into its slice of d(zxbcdt).
        _, dw, dbias = conv1d_backward(zxbcdt[..., di:di + cd], w, conv_bias, dxbc, True,
                                       dx=dzxbcdt[..., di:di + cd])
        del dxbc

        # dt path: d(dt_raw) straight into its slice of d(zxbcdt).
        ddt_bias, dA_log = _dt_backward(zxbcdt[..., di + cd:], dt_bias, A_log, dt_p, ddt, dda,
                                        dzxbcdt[..., di + cd:], shape)

        return (
            dzxbcdt,
            dw.to(conv_weight.dtype).reshape(conv_weight.shape),
            dbias.to(conv_bias.dtype) if conv_bias is not None else None,
            ddt_bias,
            dA_log,
            dD.to(D.dtype),
            dnorm_weight,
            None,
            None,
        )


def mamba_chain_triton(zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight,
                       shape: MambaChainShape) -> torch.Tensor:
    """The fused chain; argument checks are ``nemotron.kernels.mamba_chain.mamba_chain``'s."""
    device = zxbcdt.device.type
    if torch.is_autocast_enabled(device):
        conv_dtype = torch.get_autocast_dtype(device)  # what autocast's conv1d would return
    else:
        conv_dtype = torch.promote_types(zxbcdt.dtype, conv_weight.dtype)
    return MambaChainFunction.apply(zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight,
                                    shape, conv_dtype)
