"""The routed experts' weight gradients on FP8 operands: per expert e, over its rows,

    dW[e] = A[rows of e]^T @ B[rows of e]        (A: an output gradient, B: that product's input)

a contraction over each expert's rows. FP8 tensor cores multiply operands whose contraction
dimension is contiguous, so both operands are needed transposed ([cols, rows]), with each
expert's rows starting on a `GROUP_ALIGN` boundary (the product then steps through whole blocks
of rows, never into the next expert's) and one scale per expert (a scale that changed along the
contraction could not be applied after the product).

The operands exist already, quantized per row for the forward and input-gradient products
(`kernels.fp8.rowwise`: values q[r] with power-of-two inverse scales inv[r]). Their transposed
forms are made from those, not from the BF16 tensors: an expert's scale is the smallest of its
rows' (inverse: the largest, `inv_e = max inv[r]`, the scale of the expert's amax, since every
scale is the power of two below 448 / amax), and each value is multiplied by `inv[r] / inv_e`, a
power of two at most 1: exact for e4m3's normal range, rounded like any quantization below it.
One pass reads one byte and writes one byte per element (`transposed_groups`), where a
quantization from BF16 reads two and needs the amax first.

`ExpertRows` holds the row layout (from the per-expert row counts, on the device, without a
host synchronisation: the padded length is bounded by rows + experts x (GROUP_ALIGN - 1));
`transposed_groups` makes a transposed form, `grouped_weight_grad` the product. Reference
implementations here (PyTorch, any device); on CUDA the Triton kernels of
`nemotron.kernels.fp8_wgrad_triton`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemotron.kernels import use_triton
from nemotron.kernels.fp8 import FLOAT8, FLOAT8_MAX, fp8_hardware

__all__ = [
    "GROUP_ALIGN",
    "ExpertRows",
    "expert_rows",
    "grouped_weight_grad",
    "grouped_weight_grad_reference",
    "transposed_groups",
    "transposed_groups_reference",
]

# Each expert's rows start on a multiple of this in the transposed forms (the weight-gradient
# kernel's block of rows: whole blocks, no masks in its inner loop).
GROUP_ALIGN = 128


@dataclass(frozen=True)
class ExpertRows:
    """Where each row of an expert-sorted tensor goes in the transposed forms.

    group [R] int32: the expert of each row; offs [E] int32: cumulative row counts; source [P] int32: the row at each padded position
    (-1 for padding); offs_padded [E] int32: cumulative padded row counts (expert e's padded
    rows end there); P = R + E x (GROUP_ALIGN - 1) rounded up to a multiple of GROUP_ALIGN,
    enough for any counts; block_expert [P / GROUP_ALIGN] int64: the expert of each block of
    GROUP_ALIGN positions (E for the blocks after the last expert's)."""

    group: torch.Tensor
    source: torch.Tensor
    offs: torch.Tensor
    offs_padded: torch.Tensor
    block_expert: torch.Tensor

    @property
    def experts(self) -> int:
        return self.offs.numel()

    @property
    def padded(self) -> int:
        return self.source.numel()


def expert_rows(offs: torch.Tensor, rows: int) -> ExpertRows:
    """The layout for `rows` rows sorted by expert, `offs` [E] their cumulative counts (int32,
    on the device); no host synchronisation."""
    experts = offs.numel()
    dev = offs.device
    offs = offs.long()
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    padded_counts = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    offs_padded = torch.cumsum(padded_counts, 0)
    group = torch.repeat_interleave(torch.arange(experts, device=dev), counts, output_size=rows)
    shift = (offs_padded - padded_counts) - (offs - counts)  # per expert: padded start - start
    dest = torch.arange(rows, device=dev) + shift[group]
    bound = -(-(rows + experts * (GROUP_ALIGN - 1)) // GROUP_ALIGN) * GROUP_ALIGN
    source = torch.full((bound,), -1, dtype=torch.int32, device=dev)
    source.scatter_(0, dest, torch.arange(rows, dtype=torch.int32, device=dev))
    block_starts = torch.arange(0, bound, GROUP_ALIGN, device=dev)
    block_expert = torch.searchsorted(offs_padded, block_starts, right=True)
    return ExpertRows(group.int(), source, offs.int(), offs_padded.int(), block_expert)


def transposed_groups_reference(
    q: torch.Tensor, inv_rows: torch.Tensor, layout: ExpertRows, out_dtype: torch.dtype = FLOAT8
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [R, C] float8 quantized per row (inverse scales inv_rows [R]) -> (float8 [C, P]: the
    values rescaled to their expert's scale, transposed, each expert's rows from its padded
    start, zeros elsewhere; float32 [E] the experts' inverse scales)."""
    # each expert's: the largest of its rows' (1 for an expert without rows)
    inv_e = torch.ones(layout.experts, dtype=torch.float32, device=q.device)
    inv_e.scatter_reduce_(0, layout.group.long(), inv_rows.float(), "amax", include_self=False)
    ratio = inv_rows.float() / inv_e[layout.group.long()]
    values = (q.float() * ratio[:, None]).clamp(-FLOAT8_MAX, FLOAT8_MAX)
    src = layout.source.long()
    out = torch.zeros(layout.padded, q.shape[1], dtype=torch.float32, device=q.device)
    keep = src >= 0
    out[keep] = values[src[keep]]
    return out.t().contiguous().to(out_dtype), inv_e


def check_accumulate_into(buffer: torch.Tensor, shape: tuple[int, int, int]) -> None:
    """The weight-gradient products add into `buffer` only as float32 [E, M, N] contiguous
    (`kernels.fp8.summed_weight_grads`'s sums)."""
    if buffer.shape != shape or buffer.dtype != torch.float32 or not buffer.is_contiguous():
        raise ValueError(
            f"grouped_weight_grad: accumulate_into must be float32 {shape} contiguous, got "
            f"{buffer.dtype} {tuple(buffer.shape)}"
        )


def grouped_weight_grad_reference(
    at: torch.Tensor,
    a_inv: torch.Tensor,
    bt: torch.Tensor,
    b_inv: torch.Tensor,
    layout: ExpertRows,
    out_dtype: torch.dtype = torch.bfloat16,
    accumulate_into: torch.Tensor | None = None,
    round_bf16: bool = False,
) -> torch.Tensor:
    """[E, M, N] in `out_dtype`: per expert e, (at * a_inv[e]) @ (bt * b_inv[e])^T over its
    padded rows (at [M, P], bt [N, P] from `transposed_groups`), float32 products;
    `accumulate_into` (float32 [E, M, N]): the products added to it, which is returned.
    `round_bf16`: each product rounded to BF16 first (what a BF16 weight gradient holds; then
    stored in `out_dtype` or added in float32, as FSDP2 sums BF16 micro-batch gradients)."""
    ends = layout.offs_padded.tolist()
    shape = (layout.experts, at.shape[0], bt.shape[0])
    if accumulate_into is not None:
        check_accumulate_into(accumulate_into, shape)
    out = (
        accumulate_into
        if accumulate_into is not None
        else torch.empty(shape, dtype=out_dtype, device=at.device)
    )
    start = 0
    for e, end in enumerate(ends):
        a = at[:, start:end].float() * a_inv[e]
        b = bt[:, start:end].float() * b_inv[e]
        product = a @ b.t()
        if round_bf16:
            product = product.bfloat16().float()
        if accumulate_into is not None:
            out[e] += product
        else:
            out[e] = product.to(out_dtype)
        start = end
    return out


def transposed_groups(
    q: torch.Tensor, inv_rows: torch.Tensor, layout: ExpertRows
) -> tuple[torch.Tensor, torch.Tensor]:
    """`transposed_groups_reference`, by the Triton kernel on GPUs with FP8 tensor cores (Triton
    converts to e4m3 only there)."""
    if q.is_cuda and use_triton(inv_rows) and fp8_hardware(q.device):
        from nemotron.kernels.fp8_wgrad_triton import transposed_groups_triton

        return transposed_groups_triton(q, inv_rows, layout)
    return transposed_groups_reference(q, inv_rows, layout)


def grouped_weight_grad(
    at: torch.Tensor,
    a_inv: torch.Tensor,
    bt: torch.Tensor,
    b_inv: torch.Tensor,
    layout: ExpertRows,
    out_dtype: torch.dtype = torch.bfloat16,
    accumulate_into: torch.Tensor | None = None,
    round_bf16: bool = False,
) -> torch.Tensor:
    """`grouped_weight_grad_reference`, by the Triton kernel on GPUs with FP8 tensor cores (the
    rounding and the sum into `accumulate_into` in the kernel's epilogue)."""
    operands = (at, a_inv, bt, b_inv, layout)
    if at.is_cuda and use_triton(a_inv) and fp8_hardware(at.device):
        from nemotron.kernels.fp8_wgrad_triton import grouped_weight_grad_triton

        return grouped_weight_grad_triton(
            *operands, out_dtype=out_dtype, accumulate_into=accumulate_into, round_bf16=round_bf16
        )
    return grouped_weight_grad_reference(
        *operands, out_dtype=out_dtype, accumulate_into=accumulate_into, round_bf16=round_bf16
    )
