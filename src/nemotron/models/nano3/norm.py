"""RMSNorm and the grouped, gated RMSNorm of the Mamba-2 mixer, as modules.

The arithmetic lives in `nemotron.kernels.rmsnorm` (a PyTorch reference and a fused Triton
kernel used on CUDA); statistics are computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import nn

from nemotron.kernels.rmsnorm import gated_rmsnorm, rmsnorm


def upcast(x: torch.Tensor) -> torch.Tensor:
    """To float32 for the numerically sensitive parts; float64 (tests) stays float64."""
    return x if x.dtype == torch.float64 else x.float()


class RMSNorm(nn.Module):
    """`weight * x / sqrt(mean(x^2) + eps)` over the last dimension."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """`weight * rmsnorm_per_group(y * silu(z))`: the Mamba-2 output norm (gate before norm).

    The channels are split into `num_groups` contiguous groups (one per B/C group, so the norm
    never mixes channels that tensor parallelism would put on different ranks), each normalised
    by its own root mean square; the weight covers all channels.
    """

    def __init__(self, hidden_size: int, num_groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        if hidden_size % num_groups:
            raise ValueError(f"GatedRMSNorm: {hidden_size} channels do not split into {num_groups} groups")
        self.eps = eps
        self.num_groups = num_groups
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Output in y's dtype."""
        return gated_rmsnorm(y, z, self.weight, self.weight.shape[0] // self.num_groups, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, groups={self.num_groups}, eps={self.eps}"
