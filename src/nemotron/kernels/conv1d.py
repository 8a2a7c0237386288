"""Causal depthwise 1-D convolution (+ SiLU) over a channels-last sequence: the Mamba-2
mixer's short convolution of x|B|C.

    y[b, t, c] = act(bias[c] + sum_i weight[c, i] * x[b, t - (K-1) + i, c])    (x = 0 before t = 0)

``causal_conv1d`` runs the Triton kernel (``nemotron.kernels.conv1d_triton``) on CUDA tensors
when Triton imports and fast paths are on, else ``causal_conv1d_reference`` (``F.conv1d`` with
K-1 zeros of left padding, on the transposed [b, c, t] layout). The Triton path reads the
channels-last input where it lies (a strided slice of the in-projection output is fine), so no
transposed copies are made, and fuses the activation; its backward recomputes the
pre-activation instead of saving it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemotron.kernels import use_triton

__all__ = ["causal_conv1d", "causal_conv1d_reference"]

ACTIVATIONS = (None, "silu")


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation) -> None:
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [batch, seq, channels], got {tuple(x.shape)}")
    channels = x.shape[-1]
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(
            f"causal_conv1d: weight must be [{channels}, K] (or [{channels}, 1, K]), "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"causal_conv1d: bias must be [{channels}], got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be one of {ACTIVATIONS}, got {activation!r}")


def causal_conv1d_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = "silu"
) -> torch.Tensor:
    """x [b, t, c], weight [c, K] or [c, 1, K] (nn.Conv1d's), bias [c] -> [b, t, c]."""
    _check(x, weight, bias, activation)
    w = weight if weight.dim() == 3 else weight.unsqueeze(1)
    k, t = w.shape[-1], x.shape[1]
    y = F.conv1d(x.transpose(1, 2), w, bias, padding=k - 1, groups=x.shape[-1])[..., :t].transpose(1, 2)
    return F.silu(y) if activation == "silu" else y


# The package's one dispatch rule (`nemotron.kernels.use_triton`), as a module attribute so a
# test can force the Triton path on CPU under the interpreter.
_use_triton = use_triton


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = "silu"
) -> torch.Tensor:
    """The mixer's convolution: Triton on CUDA, the reference elsewhere. Output in the dtype the
    reference gives (autocast's under autocast, else x's)."""
    if _use_triton(x):
        # Triton is optional: imported when a kernel first runs (see nemotron.kernels)
        from nemotron.kernels.conv1d_triton import causal_conv1d_triton

        _check(x, weight, bias, activation)
        return causal_conv1d_triton(x, weight, bias, activation)
    return causal_conv1d_reference(x, weight, bias, activation)
