"""The MoE combine: each token's expert outputs (rows sorted by expert) gathered back and summed
with the router's weights.

    y[t] = sum_s weight[t, s] * rows[position[t*k + s]]  (+ add[t])

``position[p]`` is the sorted row of (token, slot) pair ``p``; ``order`` is its inverse (sorted
row ``j`` holds pair ``order[j]``). ``weighted_combine`` runs the Triton kernel
(``nemotron.kernels.moe_combine_triton``: one pass over the rows forward, one backward giving
both the row and the weight gradients, fp32 arithmetic) on CUDA when Triton imports and fast paths
are on, else ``weighted_combine_reference`` (row gathers and broadcast products in PyTorch).
Both are deterministic: every output element is written by exactly one program, no atomics.
The optional ``add`` [tokens, hidden] (the MoE's shared-expert output) is summed in: by the
Triton kernel in fp32 before the one rounding (no separate add pass over the output), by the
reference as ``y + add`` in the rows' dtype (the model's unfused numerics).

``row_grad_fp8``: the rows' gradient comes back as an ``Fp8Rows`` (``kernels.fp8_rows``), the
per-row FP8 form (``kernels.fp8.quantize_rows``) of the gradient the combine would return,
rounded to BF16 first, for FP8 experts that take their output gradient in that form (they
compute from BF16 values): the Triton kernel writes it
directly (no BF16 rows written and read again), the reference quantizes its BF16 result.
"""

from __future__ import annotations

import torch

from nemotron.kernels import use_triton
from nemotron.kernels.fp8 import quantize_rows
from nemotron.kernels.fp8_rows import Fp8Rows

__all__ = ["weighted_combine", "weighted_combine_reference"]


class _WeightedCombine(torch.autograd.Function):
    """Reference: row gathers and broadcast products; the weight gradient is taken in the rows'
    dtype (as a bf16 matmul would), then returned in the weights' dtype."""

    @staticmethod
    def forward(
        ctx,
        rows: torch.Tensor,
        order: torch.Tensor | None,
        position: torch.Tensor,
        weight: torch.Tensor,
        add: torch.Tensor | None = None,
        row_grad_fp8: bool = False,
    ) -> torch.Tensor:
        tokens, k = weight.shape
        if order is None and ctx.needs_input_grad[0]:
            order = torch.empty_like(position)
            order[position] = torch.arange(position.numel(), device=position.device)
        w = weight.to(rows.dtype)
        per_slot = rows.index_select(0, position).view(tokens, k, -1)
        ctx.save_for_backward(rows, order, position, w)
        ctx.weight_dtype = weight.dtype
        ctx.row_grad_fp8 = row_grad_fp8
        y = (per_slot * w.unsqueeze(-1)).sum(1)
        return y if add is None else y + add

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, order, position, w = ctx.saved_tensors
        tokens, k = w.shape
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_slots = grad.unsqueeze(1) * w.unsqueeze(-1)  # [tokens, k, hidden]
            grad_rows = grad_slots.view(tokens * k, -1).index_select(0, order)
            if ctx.row_grad_fp8:
                grad_rows = Fp8Rows(*quantize_rows(grad_rows.to(torch.bfloat16)), grad_rows.dtype)
        if ctx.needs_input_grad[3]:
            per_slot = rows.index_select(0, position).view(tokens, k, -1)
            grad_weight = (per_slot * grad.unsqueeze(1)).sum(-1).to(ctx.weight_dtype)
        return grad_rows, None, None, grad_weight, (grad if ctx.needs_input_grad[4] else None), None


def weighted_combine_reference(
    rows: torch.Tensor,
    order: torch.Tensor | None,
    position: torch.Tensor,
    weight: torch.Tensor,
    add: torch.Tensor | None = None,
    row_grad_fp8: bool = False,
) -> torch.Tensor:
    """rows [tokens*k, hidden] (expert order), order/position [tokens*k] int64 (order may be None:
    it is derived when a row gradient is needed), weight [tokens, k], optional add [tokens, hidden]
    -> [tokens, hidden] in rows' dtype. `row_grad_fp8`: see the module docstring."""
    return _WeightedCombine.apply(rows, order, position, weight, add, row_grad_fp8)


# The package's one dispatch rule (`nemotron.kernels.use_triton`), as a module attribute so a
# test can force the Triton path on CPU under the interpreter.
_use_triton = use_triton


def weighted_combine(
    rows: torch.Tensor,
    order: torch.Tensor | None,
    position: torch.Tensor,
    weight: torch.Tensor,
    add: torch.Tensor | None = None,
    row_grad_fp8: bool = False,
) -> torch.Tensor:
    """The combine the local MoE dispatcher calls: Triton on CUDA, the reference elsewhere.
    `row_grad_fp8`: the rows' gradient as an `Fp8Rows` (module docstring)."""
    if rows.dim() != 2 or weight.dim() != 2 or rows.shape[0] != weight.numel():
        raise ValueError(
            f"weighted_combine: rows [{weight.numel()}, hidden] expected for weight "
            f"{tuple(weight.shape)}, got {tuple(rows.shape)}"
        )
    if add is not None and (add.shape != (weight.shape[0], rows.shape[1]) or add.dtype != rows.dtype):
        raise ValueError(
            f"weighted_combine: add must be [{weight.shape[0]}, {rows.shape[1]}] in "
            f"{rows.dtype}, got {tuple(add.shape)} in {add.dtype}"
        )
    if _use_triton(rows):
        # Triton is optional: imported when a kernel first runs (see nemotron.kernels)
        from nemotron.kernels.moe_combine_triton import weighted_combine_triton

        return weighted_combine_triton(rows, order, position, weight, add, row_grad_fp8)
    return weighted_combine_reference(rows, order, position, weight, add, row_grad_fp8)
