"""Elementwise sum of two or three same-shape tensors (any float dtypes), computed in fp32 (float64
if any input is float64) and rounded once to ``dtype``.

The MoE uses it to sum the three gradients of its input (router in fp32, routed dispatch and
shared expert in bf16) in one pass: autograd alone would cast the router's gradient to bf16 and
add the three with two more passes, each rounding to bf16. ``add_n`` runs the Triton kernel
(``nemotron.kernels.add_n_triton``: one read of each input, one write) on CUDA when Triton
imports and fast paths are on, else ``add_n_reference`` (the same arithmetic in PyTorch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nemotron.kernels import use_triton
from nemotron.kernels.dense import dense

__all__ = ["add_n", "add_n_reference", "add_n_triton"]


def _check(tensors: Sequence[torch.Tensor]) -> None:
    if not 2 <= len(tensors) <= 3:
        raise ValueError(f"add_n: two or three tensors expected, got {len(tensors)}")
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors):
        raise ValueError(f"add_n: all shapes must match, got {[tuple(t.shape) for t in tensors]}")


def _compute_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def add_n_reference(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    _check(tensors)
    compute = _compute_dtype(tensors)
    out = tensors[0].to(compute)
    for t in tensors[1:]:
        out = out + t.to(compute)
    return out.to(dtype)


def add_n_triton(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    # Triton is optional: imported when a kernel first runs (see nemotron.kernels)
    from nemotron.kernels.add_n_triton import add_n_kernel_call

    _check(tensors)
    # gradients (add_n is a backward helper), possibly still-pending collective results
    tensors = [dense(t) for t in tensors]
    return add_n_kernel_call(tensors, dtype, _compute_dtype(tensors))


def _use_triton(tensors: Sequence[torch.Tensor]) -> bool:
    return use_triton(*tensors)


def add_n(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """sum(tensors) in fp32, rounded once to `dtype` (not differentiable: a backward helper)."""
    if _use_triton(tensors):
        return add_n_triton(tensors, dtype)
    return add_n_reference(tensors, dtype)
