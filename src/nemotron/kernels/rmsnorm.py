"""RMSNorm and the Mamba-2 gated grouped RMSNorm: references and fused Triton kernels.

Gated grouped RMSNorm (the Mamba-2 mixer's output norm, as transformers' ``MambaRMSNormGated``)::

    h   = float32(y) * silu(float32(z))
    out = weight * (h / sqrt(mean_over_group(h^2) + eps)).to(y.dtype)

with the channels split into contiguous groups of ``group_size`` (512 in Nano3: 4096 channels, 8
groups). Plain RMSNorm is the same with no gate and one group spanning the channels. Outputs
are in ``y.dtype``; statistics in float32 (float64 for float64 inputs).

``gated_rmsnorm`` / ``rmsnorm`` run the Triton kernel on CUDA (when Triton imports) and the
reference elsewhere; ``*_triton`` can be called directly (on CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemotron.kernels import use_triton

__all__ = [
    "gated_rmsnorm",
    "gated_rmsnorm_reference",
    "gated_rmsnorm_triton",
    "rmsnorm",
    "rmsnorm_reference",
    "rmsnorm_triton",
]


def _check(y: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, group_size: int) -> None:
    d = y.shape[-1]
    if z is not None and z.shape != y.shape:
        raise ValueError(
            f"gated_rmsnorm: gate shape {tuple(z.shape)} must equal input shape {tuple(y.shape)}"
        )
    if weight.shape != (d,):
        raise ValueError(f"rmsnorm: weight must be ({d},), got {tuple(weight.shape)}")
    if group_size < 1 or d % group_size != 0:
        raise ValueError(f"rmsnorm: group_size {group_size} must divide the channel count {d}")


def gated_rmsnorm_reference(
    y: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, group_size: int, eps: float = 1e-5
) -> torch.Tensor:
    """Reference gated grouped RMSNorm (``z=None``: no gate)."""
    _check(y, z, weight, group_size)
    cd = torch.float64 if y.dtype == torch.float64 else torch.float32
    h = y.to(cd)
    if z is not None:
        h = h * F.silu(z.to(cd))
    hg = h.reshape(*h.shape[:-1], h.shape[-1] // group_size, group_size)
    hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(y.dtype) * hg.reshape(h.shape).to(y.dtype)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Reference RMSNorm over the last dimension."""
    return gated_rmsnorm_reference(x, None, weight, x.shape[-1], eps)


def gated_rmsnorm_triton(
    y: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, group_size: int, eps: float = 1e-5
) -> torch.Tensor:
    """Fused Triton gated grouped RMSNorm, forward and backward."""
    _check(y, z, weight, group_size)
    # Triton is optional: imported when a kernel first runs (see nemotron.kernels)
    from nemotron.kernels.rmsnorm_triton import GatedRMSNormFunction

    return GatedRMSNormFunction.apply(y, z, weight, group_size, eps)


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return gated_rmsnorm_triton(x, None, weight, x.shape[-1], eps)


# The dispatch rule (a module attribute, so a test can force the Triton path on CPU).
_use_triton = use_triton


def gated_rmsnorm(
    y: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, group_size: int, eps: float = 1e-5
) -> torch.Tensor:
    """Gated grouped RMSNorm the Mamba-2 mixer calls: Triton on CUDA, the reference elsewhere."""
    if _use_triton(y):
        return gated_rmsnorm_triton(y, z, weight, group_size, eps)
    return gated_rmsnorm_reference(y, z, weight, group_size, eps)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dimension: Triton on CUDA, the reference elsewhere."""
    if _use_triton(x):
        return rmsnorm_triton(x, weight, eps)
    return rmsnorm_reference(x, weight, eps)
