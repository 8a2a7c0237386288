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

The dt path (``softplus(dt_raw + dt_bias)``, clamp, the per-chunk cumulative decays) works on
[batch, heads, seq] tensors, 1/64 the size of the activations: it runs in PyTorch, and its
backward recomputes those few ops under autograd to carry the SSD's dt and decay gradients to
dt_raw, dt_bias and A_log.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemotron.kernels.conv1d_triton import conv1d_backward, conv1d_forward
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


def _decays(dt_raw, dt_bias, A_log, shape: MambaChainShape):
    """dt [b, h, padded seq] (float32, zero past the end) and its within-chunk cumulative log
    decays ``cumsum(dt * A)``: the SSD kernels' layout. Differentiable (the backward re-runs it)."""
    b, s, h = dt_raw.shape
    q = shape.chunk_size
    nc = max(1, -(-s // q))
    dt = F.softplus(dt_raw.float() + dt_bias.float()).clamp(*shape.dt_limit)
    dt_p = F.pad(dt.transpose(1, 2), (0, nc * q - s)).contiguous()
    A = -torch.exp(A_log.float())
    acs = (dt_p * A[None, :, None]).view(b, h, nc, q).cumsum(-1).view(b, h, nc * q)
    return dt_p, acs


class MambaChainFunction(torch.autograd.Function):
    @staticmethod
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
        dt_p, acs = _decays(zxbcdt[..., di + cd:], dt_bias, A_log, shape)
        dims = SSDDims(x, B, shape.chunk_size)
        y, states = ssd_forward(x, dt_p, acs, B, C, None, dims, D=D)
        out, rstd = gated_rmsnorm_forward(y.view(b * s, di), z.reshape(b * s, di), norm_weight,
                                          di // shape.num_groups, shape.eps)
        ctx.save_for_backward(zxbcdt, conv_weight, w, conv_bias, dt_bias, A_log, D, norm_weight,
                              xbc, dt_p, acs, states, y, rstd)
        ctx.shape, ctx.dims = shape, dims
        return out.view(b, s, di)

    @staticmethod
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
        _, ddt, dacs, _, _, _, dD = ssd_backward(
            x, dt_p, acs, B, C, states, dy.view(x.shape), None, ctx.dims, D=D, dx=dx, dB=dB, dC=dC,
        )

        # Conv + SiLU: d(xBC) straight into its slice of d(zxbcdt).
        _, dw, dbias = conv1d_backward(zxbcdt[..., di:di + cd], w, conv_bias, dxbc, True,
                                       dx=dzxbcdt[..., di:di + cd])

        # dt path: re-run the small [b, h, seq] ops under autograd.
        with torch.enable_grad():
            raw = zxbcdt[..., di + cd:].detach().requires_grad_(True)
            bias_leaf = dt_bias.detach().requires_grad_(True)
            alog_leaf = A_log.detach().requires_grad_(True)
            dt_p2, acs2 = _decays(raw, bias_leaf, alog_leaf, shape)
            draw, ddt_bias, dA_log = torch.autograd.grad((dt_p2, acs2), (raw, bias_leaf, alog_leaf), (ddt, dacs))
        dzxbcdt[..., di + cd:].copy_(draw)

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
