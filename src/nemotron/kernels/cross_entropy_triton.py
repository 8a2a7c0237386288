"""Triton row kernel for the chunked LM-head loss (see ``nemotron.kernels.cross_entropy``).

One program per token row of a logits chunk (kept in the matmul's dtype, e.g. bf16): pass 1 is
an online max / sum-exp over the vocabulary giving the log-sum-exp and the row's loss; pass 2
(optional) overwrites the row in place with ``row_scale * (softmax - onehot(label))``, the
gradient of the weighted loss w.r.t. the logits. Two reads and one write of the bf16 row,
instead of the several float32 passes the PyTorch formulation makes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["cross_entropy_rows"]


@triton.jit
def _ce_rows_kernel(LOGITS, LABELS, ROW_SCALE, LOSS, LSE, V, stride,
                    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(base + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # Lanes that have only seen -inf (the masked tail) keep acc = 0: never form -inf - -inf.
        seen = m_new != float("-inf")
        safe_m = tl.where(seen, m_new, 0.0)
        acc = acc * tl.exp(tl.where(seen, m, 0.0) - safe_m) + tl.exp(tl.where(seen, x, float("-inf")) - safe_m)
        m = m_new
    m_row = tl.max(m, axis=0)
    total = tl.sum(acc * tl.exp(tl.where(m != float("-inf"), m, m_row) - m_row), axis=0)
    lse = m_row + tl.log(total)
    label = tl.load(LABELS + row)
    target = tl.load(base + label).to(tl.float32)
    tl.store(LOSS + row, lse - target)
    tl.store(LSE + row, lse)
    if WRITE_GRAD:
        row_scale = tl.load(ROW_SCALE + row)
        for v0 in range(0, V, BLOCK_V):
            mask = v0 + cols < V
            x = tl.load(base + v0 + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * row_scale
            g = tl.where(v0 + cols == label, g - row_scale, g)
            tl.store(base + v0 + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


def cross_entropy_rows(
    logits: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(loss, lse)`` in float32 for ``logits[M, V]`` (labels in [0, V)); if ``row_scale``
    is given, ``logits`` is overwritten with ``row_scale[:, None] * (softmax - onehot)``."""
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_rows: logits rows must be contiguous")
    m, v = logits.shape
    loss = torch.empty(m, device=logits.device, dtype=torch.float32)
    lse = torch.empty(m, device=logits.device, dtype=torch.float32)
    write = row_scale is not None
    scale = loss if row_scale is None else row_scale.to(torch.float32).contiguous()
    block = min(4096, triton.next_power_of_2(v))
    _ce_rows_kernel[(m,)](logits, labels.contiguous(), scale, loss, lse, v, logits.stride(0),
                          WRITE_GRAD=write, BLOCK_V=block, num_warps=8)
    return loss, lse
