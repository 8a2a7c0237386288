"""The routed experts' weight gradients from BF16 operands, written in float32:

    dW[e] = G[rows of e]^T @ X[rows of e]        (G: an output gradient [R, M], X: that product's input [R, N])

per expert e over its rows (sorted by expert, `offs` [E] the cumulative row counts), summed in
float32 and stored in float32, never rounded to BF16.

Why: PyTorch's BF16 grouped GEMM (`torch._grouped_mm`) writes BF16 only (asked for float32 it
runs a per-expert loop of `mm` with a host synchronisation), so under FSDP2's BF16 parameter
dtype each micro-batch's expert weight gradient is rounded to BF16 before FSDP2 converts it to
float32. Megatron-LM writes its weight gradients into float32 (gradient-accumulation fusion).
`train.experts_float32_grads` (`nemotron.train.expert_grads`) gives the BF16 experts the same,
through this product (and the FP8 experts, `train.fp8_grouped`, through theirs).

`expert_weight_grad_reference` is the reference (a float32 product per expert, any device);
`expert_weight_grad` dispatches to the Triton kernel (`nemotron.kernels.expert_wgrad_triton`:
one program per expert and output tile, the two operands read row-major where they are, no
transposed copies) on CUDA (`nemotron.kernels.use_triton`), else to the reference. Both can add
the product into a float32 buffer instead (`accumulate_into`: a gradient summed over a step's
micro-batches where it is computed, `kernels.fp8.summed_weight_grads`).
"""

from __future__ import annotations

import torch

from nemotron.kernels import use_triton

__all__ = ["check_accumulate_into", "expert_weight_grad", "expert_weight_grad_reference"]


def check_accumulate_into(buffer: torch.Tensor, shape: tuple[int, int, int]) -> None:
    """The product adds into `buffer` only as float32 `shape` [E, M, N], contiguous."""
    if tuple(buffer.shape) != tuple(shape) or buffer.dtype != torch.float32 or not buffer.is_contiguous():
        raise ValueError(
            f"expert_weight_grad: accumulate_into must be float32 {tuple(shape)} contiguous, got "
            f"{buffer.dtype} {tuple(buffer.shape)}"
        )


def _check_operands(grad: torch.Tensor, inp: torch.Tensor, offs: torch.Tensor) -> None:
    if grad.dim() != 2 or inp.dim() != 2 or grad.shape[0] != inp.shape[0]:
        raise ValueError(
            "expert_weight_grad: grad [R, M] and inp [R, N] must share their rows, got "
            f"{tuple(grad.shape)} and {tuple(inp.shape)}"
        )
    if offs.dim() != 1:
        raise ValueError(
            f"expert_weight_grad: offs must be 1-D cumulative row counts, got {tuple(offs.shape)}"
        )


def expert_weight_grad_reference(
    grad: torch.Tensor, inp: torch.Tensor, offs: torch.Tensor, accumulate_into: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 [E, M, N]: per expert e, grad[rows of e]^T @ inp[rows of e] as a float32 product
    of the operands' values; with `accumulate_into` (float32 [E, M, N]) added to it, which is
    returned. An expert without rows gets zeros (or keeps its sum)."""
    _check_operands(grad, inp, offs)
    shape = (offs.numel(), grad.shape[1], inp.shape[1])
    if accumulate_into is not None:
        check_accumulate_into(accumulate_into, shape)
        out = accumulate_into
    else:
        out = torch.zeros(shape, dtype=torch.float32, device=grad.device)
    start = 0
    # float32 products even where the caller's backward runs under autocast (a pipeline
    # schedule runs its stages' backward inside the step's autocast: BF16 products there)
    with torch.autocast(device_type=grad.device.type, enabled=False):
        for e, end in enumerate(offs.tolist()):
            if end > start:
                out[e] += grad[start:end].float().t() @ inp[start:end].float()
            start = end
    return out


def expert_weight_grad(
    grad: torch.Tensor, inp: torch.Tensor, offs: torch.Tensor, accumulate_into: torch.Tensor | None = None
) -> torch.Tensor:
    """`expert_weight_grad_reference`, by the Triton kernel on CUDA (no host synchronisation)."""
    if grad.is_cuda and use_triton(grad):
        from nemotron.kernels.expert_wgrad_triton import expert_weight_grad_triton

        return expert_weight_grad_triton(grad, inp, offs, accumulate_into=accumulate_into)
    return expert_weight_grad_reference(grad, inp, offs, accumulate_into=accumulate_into)
