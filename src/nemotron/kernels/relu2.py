"""Squared ReLU, ``relu(x)^2``: the activation of every Nano3 MLP and routed expert.

``relu2`` runs the Triton kernels (``nemotron.kernels.relu2_triton``: forward one read and one
write, backward ``grad * 2 * relu(x)`` in one pass, two reads and one write, fp32 arithmetic) on
CUDA when Triton imports and fast paths are on, else ``relu2_reference`` (PyTorch elementwise
ops: relu + square forward, relu + scale + product backward). Both save only the input for
backward. In bf16 the two agree bit for bit: the product of two bf16 values is exact in fp32, so
each output element is one rounding of the exact value on both paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemotron.kernels import use_triton

__all__ = ["relu2", "relu2_reference", "relu2_triton"]


class _SquaredReLU(torch.autograd.Function):
    # Saves only the input (autograd through relu then square would also keep relu's output,
    # one more [tokens x ffn] activation per MLP) and needs fewer elementwise passes.
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return F.relu(x).square_()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * F.relu(x).mul_(2)


def relu2_reference(x: torch.Tensor) -> torch.Tensor:
    """``relu(x)^2`` in PyTorch elementwise ops (any device and dtype)."""
    return _SquaredReLU.apply(x)


def relu2_triton(x: torch.Tensor) -> torch.Tensor:
    """``relu(x)^2`` with the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    # Triton is optional: imported when a kernel first runs (see nemotron.kernels)
    from nemotron.kernels.relu2_triton import SquaredReLUFunction

    return SquaredReLUFunction.apply(x)


# The package's one dispatch rule (`nemotron.kernels.use_triton`), as a module attribute so a
# test can force the Triton path on CPU under the interpreter.
_use_triton = use_triton


def relu2(x: torch.Tensor) -> torch.Tensor:
    """The squared ReLU the model calls: Triton on CUDA, the reference elsewhere."""
    if _use_triton(x):
        return relu2_triton(x)
    return relu2_reference(x)
