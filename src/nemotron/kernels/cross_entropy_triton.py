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

__all__ = ["cross_entropy_rows", "logit_grad_fp8"]


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
        # NaN propagates into the running max: ignored there, a NaN logit in a lane still at -inf
        # (the first block: the first 4096 tokens of the vocabulary) dropped out of the sum, a
        # finite loss where F.cross_entropy's is NaN
        m_new = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)
        # Lanes that have only seen -inf (the masked tail) keep acc = 0: never form -inf - -inf.
        seen = m_new != float("-inf")
        safe_m = tl.where(seen, m_new, 0.0)
        acc = acc * tl.exp(tl.where(seen, m, 0.0) - safe_m) + tl.exp(tl.where(seen, x, float("-inf")) - safe_m)
        m = m_new
    m_row = tl.max(m, axis=0)
    total = tl.sum(acc * tl.exp(tl.where(m != float("-inf"), m, m_row) - m_row), axis=0)
    lse = m_row + tl.log(total)
    label = tl.load(LABELS + row)
    # A label outside [0, V) is not read (it was an out-of-bounds load): its row's loss and
    # gradient are NaN, as on the PyTorch path (`cross_entropy._labels_or_nan`).
    in_vocab = (label >= 0) & (label < V)
    target = tl.load(base + label, mask=in_vocab, other=float("nan")).to(tl.float32)
    tl.store(LOSS + row, lse - target)
    tl.store(LSE + row, lse)
    if WRITE_GRAD:
        row_scale = tl.where(in_vocab, tl.load(ROW_SCALE + row), float("nan"))
        for v0 in range(0, V, BLOCK_V):
            mask = v0 + cols < V
            x = tl.load(base + v0 + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * row_scale
            g = tl.where(v0 + cols == label, g - row_scale, g)
            tl.store(base + v0 + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


def cross_entropy_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_scale: torch.Tensor | None,
    config: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(loss, lse)`` in float32 for ``logits[M, V]`` (a label outside [0, V): NaN loss
    and gradient row); if ``row_scale``
    is given, ``logits`` is overwritten with ``row_scale[:, None] * (softmax - onehot)``.
    ``config``: (vocabulary columns per iteration, warps), default `ROWS_CONFIG`."""
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_rows: logits rows must be contiguous")
    m, v = logits.shape
    loss = torch.empty(m, device=logits.device, dtype=torch.float32)
    lse = torch.empty(m, device=logits.device, dtype=torch.float32)
    write = row_scale is not None
    scale = loss if row_scale is None else row_scale.to(torch.float32).contiguous()
    block_v, warps = config or ROWS_CONFIG
    block = min(block_v, triton.next_power_of_2(v))
    _ce_rows_kernel[(m,)](logits, labels.contiguous(), scale, loss, lse, v, logits.stride(0),
                          WRITE_GRAD=write, BLOCK_V=block, num_warps=warps)
    return loss, lse


# (vocabulary columns per iteration, warps) of `_ce_rows_kernel`'s one program per row. Fixed,
# not tuned per run: the block sets the order of the row's sums, so a tuned choice could change
# the loss's last bits from run to run. The fastest measured (H100, `fp8_gemms.py --parts
# lm_head_kernels`: 0.43 ms per [4,096, 131,072] chunk; 2,048-16,384 columns, 4-16 warps slower).
ROWS_CONFIG = (4096, 8)


# (rows, vocabulary columns, warps) of one program of `_ce_grad_fp8_kernel`: the default, and
# the tiles it is tuned over on a GPU (`logit_grad_fp8`). Every tile computes each element the
# same way (no sum crosses a tile), so the choice changes the time, never a value. At the
# training layout (the transposed gradient a column slice of the group's [V, group rows]) the
# best tile differs from the best for a [V, chunk] matrix alone: on an H100, 32 x 128 (1.10 ms
# per 4,096-row chunk) against the default's 1.24 ms there, and 16 x 512 (1.01 ms) alone
# (docs/benchmarks.md, "Fourteenth round").
GRAD_FP8_TILE = (32, 256, 4)
GRAD_FP8_TILES = (
    (32, 256, 4),
    (32, 256, 8),
    (64, 128, 4),
    (64, 128, 8),
    (64, 256, 8),
    (128, 64, 4),
    (128, 128, 8),
    (128, 64, 8),
    (32, 128, 4),
    (16, 512, 4),
)


@triton.jit
def _ce_grad_fp8_kernel(LOGITS, LSE, LABELS, ROW_SCALE, SCALE_ROWS, SCALE_COLS, GQ, GQT,
                        T, V, stride_l, stride_gq, stride_gqt, max_rows, max_cols,
                        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    # One [BLOCK_T, BLOCK_V] tile of the logit gradient g = row_scale * (softmax - onehot),
    # written twice in float8: scaled by SCALE_ROWS into GQ [T, V] and by SCALE_COLS, transposed,
    # into GQT [V, >= T]. The transposed store walks T, contiguous in GQT: the tile makes both
    # layouts' writes coalesced, which a row-per-program kernel cannot.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < T
    mask = row_ok[:, None] & (cols[None, :] < V)
    x = tl.load(LOGITS + rows[:, None] * stride_l + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    s = tl.load(ROW_SCALE + rows, mask=row_ok, other=0.0)
    label = tl.load(LABELS + rows, mask=row_ok, other=-1)
    s = tl.where((label >= 0) & (label < V), s, float("nan"))  # as `cross_entropy._labels_or_nan`
    g = tl.exp(x - lse[:, None]) * s[:, None]
    g = tl.where(cols[None, :] == label[:, None], g - s[:, None], g)
    q_rows = g * tl.load(SCALE_ROWS)
    q_rows = tl.minimum(tl.maximum(q_rows, -max_rows, propagate_nan=tl.PropagateNan.ALL), max_rows,
                        propagate_nan=tl.PropagateNan.ALL)
    tl.store(GQ + rows[:, None] * stride_gq + cols[None, :], q_rows.to(GQ.dtype.element_ty), mask=mask)
    q_cols = g * tl.load(SCALE_COLS)
    q_cols = tl.minimum(tl.maximum(q_cols, -max_cols, propagate_nan=tl.PropagateNan.ALL), max_cols,
                        propagate_nan=tl.PropagateNan.ALL)
    tl.store(GQT + cols[:, None] * stride_gqt + rows[None, :], tl.trans(q_cols).to(GQT.dtype.element_ty),
             mask=tl.trans(mask))


def logit_grad_fp8(
    logits: torch.Tensor,
    lse: torch.Tensor,
    labels: torch.Tensor,
    row_scale: torch.Tensor,
    scale_rows: torch.Tensor,
    scale_cols: torch.Tensor,
    gq: torch.Tensor,
    gqt: torch.Tensor,
    clamp_rows: float | None = None,
    clamp_cols: float | None = None,
    tile: tuple[int, int, int] | None = None,
) -> None:
    """Writes ``g = row_scale[:, None] * (softmax(logits) - onehot(labels))`` (``lse`` the rows'
    log-sum-exp) as ``gq = float8(g * scale_rows)`` [M, V] and ``gqt[:, :M] = float8(g *
    scale_cols)^T``, each clamped to its dtype's largest value (NaN stays NaN); the scales are
    0-dim float32 tensors (on the device: no synchronisation). ``gq`` and ``gqt`` may be float32
    (the values before rounding: the CPU interpreter's float8 conversion is not IEEE), with
    ``clamp_rows`` / ``clamp_cols`` the largest values of the float8 dtypes they stand for.
    ``tile``: (rows, vocabulary columns, warps) per program; None: on a GPU the fastest of
    `GRAD_FP8_TILES` for this shape (tuned on first use), elsewhere `GRAD_FP8_TILE`."""
    m, v = logits.shape
    if logits.stride(1) != 1 or gq.stride(1) != 1 or gqt.stride(1) != 1:
        raise ValueError("logit_grad_fp8: rows must be contiguous")
    if gq.shape != (m, v) or gqt.shape[0] != v or gqt.shape[1] < m:
        raise ValueError(f"logit_grad_fp8: gq {tuple(gq.shape)} / gqt {tuple(gqt.shape)} for logits {(m, v)}")
    if m == 0:
        return
    args = (
        logits, lse.contiguous(), labels.contiguous(), row_scale.to(torch.float32).contiguous(),
        scale_rows, scale_cols, gq, gqt, m, v, logits.stride(0), gq.stride(0), gqt.stride(0),
        clamp_rows or _dtype_max(gq.dtype), clamp_cols or _dtype_max(gqt.dtype),
    )
    if tile is None and logits.is_cuda:
        # the tile measured fastest for this shape and layout, once per process (`_grad_tuned`)
        _grad_tuned()[lambda meta: (triton.cdiv(m, meta["BLOCK_T"]), triton.cdiv(v, meta["BLOCK_V"]))](*args)
        return
    block_t, block_v, warps = tile or GRAD_FP8_TILE
    _ce_grad_fp8_kernel[(triton.cdiv(m, block_t), triton.cdiv(v, block_v))](
        *args, BLOCK_T=block_t, BLOCK_V=block_v, num_warps=warps
    )


_GRAD_TUNED: list = []


def _grad_tuned():
    """`_ce_grad_fp8_kernel` under `triton.autotune` over `GRAD_FP8_TILES`, keyed on the chunk's
    rows, the vocabulary and the three row strides (the transposed output's is the group's
    rows). The kernel only writes its outputs, so timing a tile repeats the same stores."""
    if not _GRAD_TUNED:
        configs = [
            triton.Config({"BLOCK_T": t, "BLOCK_V": c}, num_warps=w) for t, c, w in GRAD_FP8_TILES
        ]
        key = ["T", "V", "stride_l", "stride_gq", "stride_gqt"]
        _GRAD_TUNED.append(triton.autotune(configs=configs, key=key)(_ce_grad_fp8_kernel))
    return _GRAD_TUNED[0]


def _dtype_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)
