"""The Mamba-2 mixer between its two projections as one fused autograd step.

    z, xBC, dt_raw = split(zxbcdt)                 (views, no copies)
    xBC            = silu(causal_conv1d(xBC))      Triton conv, reads the strided slice
    dt             = clamp(softplus(dt_raw + dt_bias))
    y              = SSD(x, dt, -exp(A_log), B, C) + D x     Triton SSD, D skip fused, x/B/C strided
    out            = gated_rmsnorm(y, z)           Triton norm, reads the strided gate

``mamba_chain`` is this chain on the fast path; its backward writes the gradients of z, xBC and
dt_raw straight into slices of one ``d(zxbcdt)`` buffer (no split-backward concatenation, no
contiguous copies of x/B/C/z, no separate D-skip kernels). The mixer calls it when
``chain_supported`` says so (CUDA, Triton importable, fast paths on, no context parallelism,
no replaced conv); otherwise it runs the step-by-step path, whose PyTorch reference is the
ground truth this is tested against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["MambaChainShape", "chain_supported", "fused_chain", "mamba_chain", "mamba_chain_reference"]

_FUSED_CHAIN = {"enabled": True}


@contextlib.contextmanager
def fused_chain(enabled: bool) -> Iterator[None]:
    """Switch the fused chain off (``False``) for the code inside, leaving the other fast paths
    on: the mixer then runs its step-by-step fast path (process-wide; benchmarks and GPU tests
    compare the two)."""
    previous = _FUSED_CHAIN["enabled"]
    _FUSED_CHAIN["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _FUSED_CHAIN["enabled"] = previous


@dataclass(frozen=True)
class MambaChainShape:
    """The mixer's sizes the chain needs (``d_inner = num_heads * head_dim``)."""

    num_heads: int
    head_dim: int
    num_groups: int
    state_size: int
    chunk_size: int
    eps: float
    dt_limit: tuple[float, float] = (0.0, float("inf"))

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.num_groups * self.state_size

    @property
    def in_proj_dim(self) -> int:
        return self.d_inner + self.conv_dim + self.num_heads


def chain_supported(zxbcdt: torch.Tensor, chunk_size: int) -> bool:
    """True where the fused chain runs: a CUDA tensor below float64, Triton importable, fast
    paths on, ``fused_chain`` not switched off, and a power-of-two chunk of at least 16 (the
    SSD kernel's tiles)."""
    from nemotron.kernels import fast_paths_enabled, triton_available

    power_of_two = chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0
    return (
        _FUSED_CHAIN["enabled"]
        and zxbcdt.is_cuda
        and zxbcdt.dtype != torch.float64
        and power_of_two
        and fast_paths_enabled()
        and triton_available()
    )


def _check(zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, shape: MambaChainShape) -> None:
    if zxbcdt.dim() != 3 or zxbcdt.shape[-1] != shape.in_proj_dim:
        raise ValueError(
            f"mamba_chain: zxbcdt must be [batch, seq, {shape.in_proj_dim}], got {tuple(zxbcdt.shape)}"
        )
    if conv_weight.numel() % shape.conv_dim or conv_weight.shape[0] != shape.conv_dim:
        raise ValueError(
            f"mamba_chain: conv weight must be [{shape.conv_dim}, (1,) K], got {tuple(conv_weight.shape)}"
        )
    if conv_bias is not None and tuple(conv_bias.shape) != (shape.conv_dim,):
        raise ValueError(f"mamba_chain: conv bias must be [{shape.conv_dim}], got {tuple(conv_bias.shape)}")
    for name, t in (("dt_bias", dt_bias), ("A_log", A_log), ("D", D)):
        if tuple(t.shape) != (shape.num_heads,):
            raise ValueError(f"mamba_chain: {name} must be [{shape.num_heads}], got {tuple(t.shape)}")
    if tuple(norm_weight.shape) != (shape.d_inner,):
        raise ValueError(
            f"mamba_chain: norm weight must be [{shape.d_inner}], got {tuple(norm_weight.shape)}"
        )
    if shape.d_inner % shape.num_groups or shape.num_heads % shape.num_groups:
        raise ValueError(
            f"mamba_chain: {shape.num_groups} groups must divide the heads ({shape.num_heads}) "
            f"and channels ({shape.d_inner})"
        )
    if shape.chunk_size < 16 or shape.chunk_size & (shape.chunk_size - 1):
        raise ValueError(f"mamba_chain: chunk_size must be a power of two >= 16, got {shape.chunk_size}")


def mamba_chain(
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    norm_weight: torch.Tensor,
    shape: MambaChainShape,
) -> torch.Tensor:
    """zxbcdt [b, s, in_proj_dim] -> the gated-normed SSD output [b, s, d_inner], in the conv
    output's dtype (autocast's under autocast). Runs the Triton kernels (on CUDA, or on CPU under
    ``TRITON_INTERPRET=1``); callers check ``chain_supported`` first."""
    _check(zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, shape)
    from nemotron.kernels.mamba_chain_triton import mamba_chain_triton

    return mamba_chain_triton(zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, shape)


def mamba_chain_reference(
    zxbcdt: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    norm_weight: torch.Tensor,
    shape: MambaChainShape,
) -> torch.Tensor:
    """The chain from the PyTorch references, op by op (what the mixer's reference path computes
    between its projections): the ground truth ``mamba_chain`` is tested against."""
    import torch.nn.functional as F

    from nemotron.kernels.conv1d import causal_conv1d_reference
    from nemotron.kernels.rmsnorm import gated_rmsnorm_reference
    from nemotron.kernels.ssd import ssd_chunked_reference

    _check(zxbcdt, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, shape)
    b, s, _ = zxbcdt.shape
    di, gn = shape.d_inner, shape.num_groups * shape.state_size
    z, xbc, dt = torch.split(zxbcdt, [di, shape.conv_dim, shape.num_heads], dim=-1)
    xbc = causal_conv1d_reference(xbc, conv_weight, conv_bias, "silu")
    x, B, C = torch.split(xbc, [di, gn, gn], dim=-1)
    cd = torch.float64 if zxbcdt.dtype == torch.float64 else torch.float32
    dt = F.softplus(dt.to(cd) + dt_bias.to(cd)).clamp(*shape.dt_limit)
    x = x.reshape(b, s, shape.num_heads, shape.head_dim)
    y, _ = ssd_chunked_reference(
        x,
        dt,
        -torch.exp(A_log.to(cd)),
        B.reshape(b, s, shape.num_groups, shape.state_size),
        C.reshape(b, s, shape.num_groups, shape.state_size),
        shape.chunk_size,
    )
    y = (y.to(cd) + x.to(cd) * D.to(cd)[:, None]).to(x.dtype)
    return gated_rmsnorm_reference(y.reshape(b, s, di), z, norm_weight, di // shape.num_groups, shape.eps)
