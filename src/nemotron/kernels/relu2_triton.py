"""Triton squared ReLU; see ``nemotron.kernels.relu2`` for the dispatch.

Both kernels tile the flattened tensor in 1-D blocks of ``BLOCK`` elements along grid axis 0
(2^31 - 1 programs: no limit for any real activation) with int64 offsets, so tensors of more
than 2^31 elements (long sequences x top-k x expert width) index correctly. Forward: one read,
one write, ``relu(x)^2`` in fp32. Backward: ``grad * 2 * relu(x)``, two reads, one write. NaN
inputs stay NaN, as in ``torch.relu``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nemotron.kernels.dense import dense_inputs

__all__ = ["SquaredReLUFunction", "RELU2_TRITON_CONFIG"]

RELU2_TRITON_CONFIG = {"block": 4096, "num_warps": 8}


@triton.jit
def _relu(X, offs, mask, COMPUTE: tl.constexpr):
    # NaN propagates, as in torch.relu: a NaN activation must reach the loss, not become 0.
    x = tl.load(X + offs, mask=mask, other=0.0).to(COMPUTE)
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _relu2_fwd_kernel(X, Y, N, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    r = _relu(X, offs, mask, COMPUTE)
    tl.store(Y + offs, (r * r).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _relu2_bwd_kernel(X, DY, DX, N, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    r = _relu(X, offs, mask, COMPUTE)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(COMPUTE)
    tl.store(DX + offs, (dy * (2.0 * r)).to(DX.dtype.element_ty), mask=mask)


def _launch(kernel, n: int, *tensors: torch.Tensor) -> None:
    cfg = RELU2_TRITON_CONFIG
    # fp32 arithmetic for bf16/fp16/fp32; float64 (CPU checks under the interpreter) stays float64
    compute = tl.float64 if tensors[0].dtype == torch.float64 else tl.float32
    if n:
        kernel[(triton.cdiv(n, cfg["block"]),)](*tensors, n, BLOCK=cfg["block"], COMPUTE=compute,
                                                num_warps=cfg["num_warps"])


class SquaredReLUFunction(torch.autograd.Function):
    @staticmethod
    @dense_inputs
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        _launch(_relu2_fwd_kernel, x.numel(), x, y)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    @dense_inputs
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        grad = grad.contiguous()
        dx = torch.empty_like(x)
        _launch(_relu2_bwd_kernel, x.numel(), x, grad, dx)
        return dx
