"""The single-device MoE dispatcher for FP8 experts with FP8 weight gradients: token rows moved
in their per-row FP8 form (`Fp8LocalDispatcher`).

With `train.fp8.experts_weight_grad=fp8` the routed experts (`fp8_grouped`) use their input rows
and their output gradient only in per-row FP8 form (every product and the weight gradients'
transposed forms are made from it), yet `LocalDispatcher` hands them BF16 rows both ways:

- forward, each token's row copied once per chosen expert (k = 6 copies) in BF16, then every
  copy quantized. Here one pass (`kernels.fp8.rowwise_to`) reads each token once, quantizes it
  (one scale per row, the same for every copy) and writes its FP8 values and scale to its k
  sorted places: k times fewer rows quantized, no BF16 copies written or read;
- backward, the combine writes each row's gradient (router weight x the token's gradient) in
  BF16 and the experts read it again to quantize it. Here the combine writes it quantized
  (`weighted_combine(..., row_grad_fp8=True)`).

The experts receive `kernels.fp8_rows.Fp8Rows` (BF16-typed tensors holding the FP8 values and
scales) and compute exactly what they compute from the BF16 rows: same roundings, bit for bit
(`tests/train/test_fp8.py`). `apply_fp8` installs it in place of the model's `LocalDispatcher`
when the experts run FP8 weight gradients; expert parallelism then swaps in its all-to-all
dispatcher, whose BF16 rows the experts quantize themselves.
"""

from __future__ import annotations

import torch

from nemotron.kernels.fp8 import rowwise_to
from nemotron.kernels.fp8_rows import Fp8Rows
from nemotron.kernels.moe_combine import weighted_combine
from nemotron.models.nano3.moe import (
    DispatchContext,
    LocalDispatcher,
    inverse_permutation,
    sum_token_row_grads,
)

__all__ = ["Fp8LocalDispatcher", "gather_fp8_token_rows"]


class _GatherFp8TokenRows(torch.autograd.Function):
    """rows[position[t*k + s]] = x[t] in per-row FP8 (the dispatch gather's rows: row j holds
    token order[j] // k), x [tokens, hidden] quantized per row as it is written to its k places.
    Backward: as `moe.gather_token_rows`'s (BF16 gradients)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, position: torch.Tensor, k: int) -> Fp8Rows:
        ctx.save_for_backward(position)
        ctx.k, ctx.x_dtype = k, x.dtype
        # the experts' products take BF16 rows: x's values rounded to BF16 first, as they do;
        # each token quantized once and its row written to its k sorted places
        rows_q, rows_inv = rowwise_to(x.to(torch.bfloat16), position, k)
        # standing for x's rows in x's dtype, as the gathered rows would be
        return Fp8Rows(rows_q, rows_inv, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (position,) = ctx.saved_tensors
        return sum_token_row_grads(grad, position, ctx.k).to(ctx.x_dtype), None, None


def gather_fp8_token_rows(x: torch.Tensor, position: torch.Tensor, k: int) -> Fp8Rows:
    """`moe.gather_token_rows` with the rows in per-row FP8 form (an `Fp8Rows`; `position`: the
    sorted row of each (token, slot) pair)."""
    return _GatherFp8TokenRows.apply(x, position, k)


class Fp8LocalDispatcher(LocalDispatcher):
    """`LocalDispatcher` (same sort, same combine) moving the rows to and from the experts in
    per-row FP8 form: for FP8 experts with FP8 weight gradients only (module docstring)."""

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        """x [tokens, hidden] -> (`Fp8Rows` sorted by expert [tokens*k, hidden], counts, ctx);
        under `torch.compile` (`train.compile`) the BF16 rows of `LocalDispatcher`: the compiler
        does not trace the `Fp8Rows` subclass made inside an autograd function (same values)."""
        if torch.compiler.is_compiling():
            return super().dispatch(x, topk_idx, topk_weight)
        order, position, counts = self.sort_by_expert(topk_idx)
        rows = gather_fp8_token_rows(x, position, topk_idx.shape[1])
        return rows, counts, DispatchContext(order, topk_weight, position)

    def combine(
        self, expert_out: torch.Tensor, ctx: DispatchContext, add: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`LocalDispatcher.combine`; the experts' output gradient comes back as an `Fp8Rows`
        (BF16 under `torch.compile`, as `dispatch`)."""
        if torch.compiler.is_compiling():
            return super().combine(expert_out, ctx, add)
        position = ctx.position if ctx.position is not None else inverse_permutation(ctx.order)
        return weighted_combine(expert_out, ctx.order, position, ctx.topk_weight, add, row_grad_fp8=True)
