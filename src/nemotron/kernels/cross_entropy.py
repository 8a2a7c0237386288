"""Memory-light LM-head loss: linear layer + cross-entropy without full [tokens x vocab] logits.

``linear_cross_entropy`` walks the tokens in chunks; each chunk's logits (``[chunk, V]``) live only
while that chunk is processed. On CUDA a Triton row kernel (``cross_entropy_triton``) turns the
chunk's logits, kept in the matmul dtype, into the loss and, in place, the logit gradient in two
reads and one write; elsewhere the same is done in float32 PyTorch. With ``grad_in_forward``
(the default when a gradient is needed) the forward pass also produces the input and weight
gradients chunk by chunk, so the backward pass is a scale: 3 matmuls in total instead of the 4
that recompute-in-backward needs. Memory beyond the inputs: one chunk of logits plus gradient
buffers the size of ``hidden`` and (float32) ``weight``. With ``grad_in_forward=False`` nothing is
kept between the passes and the backward recomputes each chunk's logits.

``fp8=True``: the same chunks with every product on float8 operands (`_fp8_loss_and_grads`); the
logit gradient is never written in BF16: one pass (a Triton kernel on CUDA) writes it in float8 twice, row-major
for the hidden gradient and transposed for the weight gradient, which runs once per group of
``fp8_group_rows`` rows (default `WGRAD_GROUP_ROWS`).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from nemotron.kernels import use_triton
from nemotron.kernels.dense import dense_inputs
from nemotron.kernels.fp8 import (
    FLOAT8,
    FLOAT8_MAX,
    FLOAT8_WIDE,
    FLOAT8_WIDE_MAX,
    FP8_ALIGN,
    compiled,
    quantize_tensor,
    quantized_weight,
    scale_for,
    tensorwise_mm,
)

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "IGNORE_INDEX", "WGRAD_GROUP_ROWS"]

IGNORE_INDEX = -100


def token_weights(
    labels: torch.Tensor, loss_mask: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The LM loss's per-token weights (the one rule, also for counting loss tokens across
    ranks): 0 where labels == IGNORE_INDEX, times `loss_mask` (0/1 or weights) if given."""
    w = (labels != IGNORE_INDEX).to(dtype)
    if loss_mask is not None:
        w = w * loss_mask.to(dtype)
    return w


def _token_weights(labels: torch.Tensor, loss_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights of the mean and the denominator (>= 1)."""
    w = token_weights(labels, loss_mask)
    return w, w.sum().clamp_min(1.0)


def _check(hidden, weight, labels, loss_mask, chunk_size):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            "linear_cross_entropy: hidden must be [N, h] and weight [V, h], "
            f"got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: labels must be [{hidden.shape[0]}], got {tuple(labels.shape)}"
        )
    if loss_mask is not None and loss_mask.shape != labels.shape:
        raise ValueError(
            f"linear_cross_entropy: loss_mask must be [{labels.shape[0]}], got {tuple(loss_mask.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be positive, got {chunk_size}")


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy from full float32 logits (``F.cross_entropy``); the ground truth."""
    logits = (hidden @ weight.t()).float() if hidden.dtype != torch.float64 else hidden @ weight.t()
    per_token = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    w, denom = _token_weights(labels, loss_mask)
    return (per_token * w.to(per_token.dtype)).sum() / denom.to(per_token.dtype)


def _rows_torch(logits: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor | None):
    """PyTorch path: (per-row loss, lse, gradient w.r.t. the logits or None)."""
    lowp = logits.dtype
    logits = logits if logits.dtype == torch.float64 else logits.float()
    # A label outside the vocabulary gives its row a NaN loss and gradient (`_labels_or_nan`).
    in_vocab, labels = _in_vocab(labels, logits.shape[1])
    lse = torch.logsumexp(logits, dim=-1)
    loss = _labels_or_nan(in_vocab, lse - logits.gather(1, labels[:, None])[:, 0])
    grad = None
    if row_scale is not None:
        # In place: logits -> row_scale * (softmax(logits) - onehot(labels)).
        probs = logits.sub_(lse[:, None]).exp_()
        probs.scatter_add_(1, labels[:, None], -torch.ones_like(lse[:, None]))
        grad = probs.mul_(_labels_or_nan(in_vocab, row_scale.to(probs.dtype))[:, None]).to(lowp)
    return loss, lse, grad


def _in_vocab(labels: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels in [0, vocab), the labels clamped into it: safe to index with)."""
    return (labels >= 0) & (labels < vocab), labels.clamp(0, vocab - 1)


def _labels_or_nan(in_vocab: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`values` per row, NaN where the row's label is outside the vocabulary: such a label
    (a tokenizer/vocabulary mismatch) must not pass as some other token's loss, and checking
    labels on the host would synchronise with the device every chunk; the NaN reaches the loss,
    which the trainer's non-finite check stops on. The Triton row kernel does the same."""
    return torch.where(in_vocab, values, torch.full_like(values, float("nan")))


def _rows_triton(logits: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor | None):
    """Triton path: one fused row kernel; the gradient overwrites the logits buffer."""
    # Triton is optional: imported when a kernel first runs (see nemotron.kernels)
    from nemotron.kernels.cross_entropy_triton import cross_entropy_rows

    loss, lse = cross_entropy_rows(logits, labels, row_scale)
    return loss, lse, (logits if row_scale is not None else None)


_FP32_OUT_ADDMM: dict[str, bool | None] = {
    "ok": None
}  # does this build's addmm take out_dtype (CUDA bf16 -> fp32)?


def _accumulate_weight_grad(dweight: torch.Tensor, grad: torch.Tensor, h: torch.Tensor) -> None:
    """dweight (float32/64) += grad^T @ h, without a low-precision [V, h] temporary when possible."""
    if grad.dtype == dweight.dtype:
        dweight.addmm_(grad.t(), h)
        return
    if grad.is_cuda and _FP32_OUT_ADDMM["ok"] is not False:
        try:
            torch.addmm(dweight, grad.t(), h, out_dtype=dweight.dtype, out=dweight)
            _FP32_OUT_ADDMM["ok"] = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_OUT_ADDMM["ok"] = False
    dweight += (grad.t() @ h).to(dweight.dtype)


class Fp8HeadWeight:
    """The FP8 copy of one LM head weight (one scale for the tensor, row-major and transposed:
    the logits' and the input gradient's operands), made on first use and reused within a
    `kernels.fp8.reuse_quantized_weights` scope under the identity of the weight parameter
    `param` (`linear_cross_entropy(fp8=True)` makes one per call)."""

    def __init__(self, param: torch.Tensor) -> None:
        self.param = param
        self._made: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # within one pass

    def tensorwise(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w_q [V, h], w_q^T [h, V], inverse scale) for w [V, h]."""
        if self._made is None:
            quantize = compiled("lm_head_weight", quantize_tensor, w.device)
            self._made = quantized_weight(  # type: ignore[assignment]
                self.param, "lm_head.tensorwise", w, lambda t: quantize(t, FLOAT8, t.shape[0])
            )
        assert self._made is not None
        return self._made

    def release(self) -> None:
        """Drop this pass's references (a reuse scope keeps its own)."""
        self._made = None


# The default rows of hidden per FP8 scale group, whose logit gradients (transposed, [V, rows]
# float8: 1 GiB at V = 131,072) are held for one weight-gradient product. Held for a whole
# micro-batch (24,576 rows on the one-GPU proxy) they save two [V, h] accumulation passes
# (~1 ms each) but their 3 GiB, at the step's peak of memory, sent the H200 proxy with BF16
# experts into allocator retries (docs/benchmarks.md); `train.fp8.lm_head_group_rows` sets it.
WGRAD_GROUP_ROWS = 8192


def _weight_grad_fp8(
    gqt: torch.Tensor,
    g_inv: torch.Tensor,
    hqt: torch.Tensor,
    h_inv: torch.Tensor,
    dweight: torch.Tensor | None,
    acc: torch.dtype,
    fast_accum: bool,
) -> torch.Tensor:
    """dweight (acc dtype [V, h]; None: a new one) += (gqt * g_inv) @ (hqt * h_inv)^T. The first
    product is written in `acc` directly; later ones in BF16 and added (a BF16 [V, h] temporary
    instead of a float32 one; their FP8 error is ~50x BF16's rounding)."""
    if dweight is None:
        return tensorwise_mm(gqt, g_inv, hqt, h_inv, out_dtype=acc, fast_accum=fast_accum)
    return dweight.add_(tensorwise_mm(gqt, g_inv, hqt, h_inv, fast_accum=fast_accum))


def _logit_grad_fp8_torch(logits, lse, labels, row_scale, scale_rows, scale_cols, gq, gqt) -> None:
    """PyTorch path of `cross_entropy_triton.logit_grad_fp8` (same contract, float8 outputs)."""
    m = logits.shape[0]
    in_vocab, labels = _in_vocab(labels, logits.shape[1])
    row_scale = _labels_or_nan(in_vocab, row_scale)
    g = torch.exp(logits.float() - lse[:, None]) * row_scale[:, None]
    idx = torch.arange(m, device=logits.device)
    g[idx, labels] = g[idx, labels] - row_scale
    gq.copy_((g * scale_rows).clamp(-FLOAT8_MAX, FLOAT8_MAX))
    gqt[:, :m].copy_((g * scale_cols).clamp(-FLOAT8_WIDE_MAX, FLOAT8_WIDE_MAX).t())


def _logit_grad_fp8_triton(logits, lse, labels, row_scale, scale_rows, scale_cols, gq, gqt) -> None:
    from nemotron.kernels.cross_entropy_triton import logit_grad_fp8

    logit_grad_fp8(logits, lse, labels, row_scale, scale_rows, scale_cols, gq, gqt)


def _fp8_loss_and_grads(
    h_all: torch.Tensor,
    w: torch.Tensor,
    head: Fp8HeadWeight,
    labels: torch.Tensor,
    token_w: torch.Tensor,
    row_scale: torch.Tensor | None,
    chunk_size: int,
    group_rows: int,
    fast_accum: bool,
    use_triton: bool,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chunked loss with every LM-head product on float8 operands (see `linear_cross_entropy`):
    (sum of token_w * loss, d hidden or None, d weight or None), the gradients those of the loss
    weighted per row by `row_scale` (None: no gradients).

    Scales, one per tensor, powers of two: W per call; the hidden rows per group of `group_rows`
    rows rounded down to whole chunks (at least one chunk; they are also the weight gradient's
    operand); the logit gradient twice, from one pass over the logits that writes both: per
    chunk in e4m3 for the input gradient (the chunk's largest |g| is known before the pass: a
    row's is |s| (1 - p_label), as every other probability is at most 1 - p_label), and per
    group in e5m2, transposed, for the weight gradient (bounded by the largest |s|: e5m2's range
    keeps the softmax tails of rare vocabulary rows, which e4m3 at that scale would flush to
    zero). `fast_accum`: the logits' and the weight gradient's products accumulate in the
    tensor cores' own accumulator (`kernels.fp8`); the hidden gradient's, a contraction over the
    vocabulary, never does."""
    n = h_all.shape[0]
    v = w.shape[0]
    dev = h_all.device
    rows = _rows_triton if use_triton else _rows_torch
    logit_grad = _logit_grad_fp8_triton if use_triton else _logit_grad_fp8_torch
    quantize_hidden = compiled("lm_head_hidden", quantize_tensor, dev)
    wq, wqt, w_inv = head.tensorwise(w)
    total = torch.zeros((), dtype=acc, device=dev)
    dhidden = None if row_scale is None else torch.empty_like(h_all)
    dweight = None
    group = max(chunk_size, group_rows // chunk_size * chunk_size)
    for g0 in range(0, n, group):
        g1 = min(n, g0 + group)
        cols = -(-(g1 - g0) // FP8_ALIGN) * FP8_ALIGN  # the contraction of the weight gradient
        hq, hqt, h_inv = quantize_hidden(h_all[g0:g1], FLOAT8, None if row_scale is None else cols)
        if row_scale is not None:
            scale_cols = scale_for(row_scale[g0:g1].abs().amax(), FLOAT8_WIDE)
            gqt = torch.empty(v, cols, dtype=FLOAT8_WIDE, device=dev)
            gqt[:, g1 - g0 :].zero_()
        for s in range(g0, g1, chunk_size):
            e = min(g1, s + chunk_size)
            logits = tensorwise_mm(hq[s - g0 : e - g0], h_inv, wq, w_inv, fast_accum=fast_accum)
            loss, lse, _ = rows(logits, labels[s:e], None)
            total += (loss.to(acc) * token_w[s:e]).sum()
            if row_scale is not None:
                sc = row_scale[s:e]
                scale_rows = scale_for((sc.abs() * -torch.expm1(-loss.float())).amax(), FLOAT8)
                gq = torch.empty(e - s, v, dtype=FLOAT8, device=dev)
                logit_grad(logits, lse, labels[s:e], sc, scale_rows, scale_cols, gq, gqt[:, s - g0 :])
                del logits
                assert dhidden is not None
                dhidden[s:e] = tensorwise_mm(gq, 1.0 / scale_rows, wqt, w_inv)
        if row_scale is not None:
            dweight = _weight_grad_fp8(gqt, 1.0 / scale_cols, hqt, h_inv, dweight, acc, fast_accum)
    if row_scale is not None and dweight is None:  # no rows
        dweight = torch.zeros(w.shape, dtype=acc, device=dev)
    return total, dhidden, dweight


def _head_products(w: torch.Tensor):
    """(hidden chunk -> logits, logit gradient -> hidden gradient) for the LM head weight w
    [V, h] in the compute dtype."""
    return (lambda h: h @ w.t()), (lambda g: g @ w)


def _bf16_loss_and_grads(
    h_all: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    token_w: torch.Tensor,
    row_scale: torch.Tensor | None,
    chunk_size: int,
    rows,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The chunked loss in the compute dtype: (sum of token_w * loss, d hidden or None, d weight
    or None), the gradients those of the loss weighted per row by `row_scale` (None: none)."""
    n = h_all.shape[0]
    logits_of, input_grad_of = _head_products(w)
    total = torch.zeros((), dtype=acc, device=h_all.device)
    dhidden = dweight = None
    if row_scale is not None:
        dhidden = torch.empty_like(h_all)
        dweight = torch.zeros(w.shape, dtype=acc, device=w.device)
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        scale = None if row_scale is None else row_scale[s:e]
        loss, _, grad = rows(logits_of(h_all[s:e]), labels[s:e], scale)
        total += (loss.to(acc) * token_w[s:e]).sum()
        if dhidden is not None and dweight is not None:
            dhidden[s:e] = input_grad_of(grad)
            _accumulate_weight_grad(dweight, grad, h_all[s:e])
    return total, dhidden, dweight


class _LinearCrossEntropy(torch.autograd.Function):
    # Matmuls run in `compute` dtype with autocast off (autocast's choice is made by the caller),
    # so forward and backward agree whether or not the backward runs under autocast.
    @staticmethod
    @dense_inputs
    def forward(
        ctx,
        hidden,
        weight,
        labels,
        token_w,
        denom,
        chunk_size,
        grad_in_forward,
        use_triton,
        compute,
        fp8,
        fp8_group_rows,
        fp8_fast_accum,
    ):
        acc = torch.float64 if compute == torch.float64 else torch.float32
        rows = _rows_triton if use_triton else _rows_torch
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(compute), weight.to(compute)
            # ignored rows (weight 0) read label 0; any other label outside the vocabulary,
            # -1 included, gives a NaN loss (`_labels_or_nan`), never another token's
            safe_labels = labels.masked_fill(labels == IGNORE_INDEX, 0)
            token_w = token_w.to(acc)
            inv_denom = 1.0 / denom.to(acc)
            row_scale = token_w * inv_denom if grad_in_forward else None
            if fp8 is not None:
                total, dhidden, dweight = _fp8_loss_and_grads(
                    h_all,
                    w,
                    fp8,
                    safe_labels,
                    token_w,
                    row_scale,
                    chunk_size,
                    fp8_group_rows,
                    fp8_fast_accum,
                    use_triton,
                    acc,
                )
                fp8.release()  # not held until backward
            else:
                total, dhidden, dweight = _bf16_loss_and_grads(
                    h_all, w, safe_labels, token_w, row_scale, chunk_size, rows, acc
                )
        ctx.chunk_size = chunk_size
        ctx.grad_in_forward = grad_in_forward
        ctx.use_triton = use_triton
        ctx.compute = compute
        ctx.fp8, ctx.fp8_group_rows, ctx.fp8_fast_accum = fp8, fp8_group_rows, fp8_fast_accum
        if grad_in_forward:
            ctx.save_for_backward(dhidden, dweight)
        else:
            ctx.save_for_backward(hidden, weight, safe_labels, token_w, inv_denom)
        return total * inv_denom

    @staticmethod
    @dense_inputs
    def backward(ctx, grad_out):
        nones = (None,) * 10
        if ctx.grad_in_forward:
            dhidden, dweight = ctx.saved_tensors
            g = grad_out.to(dweight.dtype)
            # the weight gradient scaled and cast in one pass (`out=` in the weight's dtype, the
            # product in the accumulation dtype as before): no temporary of the [V, h]
            # accumulation-dtype gradient while every activation of the micro-batch is held
            grad_weight = torch.empty(dweight.shape, dtype=ctx.weight_dtype, device=dweight.device)
            torch.mul(dweight, g, out=grad_weight)
            return (dhidden * g.to(dhidden.dtype)).to(ctx.hidden_dtype), grad_weight, *nones
        hidden, weight, labels, token_w, inv_denom = ctx.saved_tensors
        rows = _rows_triton if ctx.use_triton else _rows_torch
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(ctx.compute), weight.to(ctx.compute)
            scale_all = token_w * (inv_denom * grad_out.to(token_w.dtype))
            acc = token_w.dtype
            if ctx.fp8 is not None:
                _, dhidden, dweight = _fp8_loss_and_grads(
                    h_all,
                    w,
                    ctx.fp8,
                    labels,
                    token_w,
                    scale_all,
                    ctx.chunk_size,
                    ctx.fp8_group_rows,
                    ctx.fp8_fast_accum,
                    ctx.use_triton,
                    acc,
                )
                ctx.fp8.release()
            else:
                _, dhidden, dweight = _bf16_loss_and_grads(
                    h_all, w, labels, token_w, scale_all, ctx.chunk_size, rows, acc
                )
        assert dhidden is not None and dweight is not None
        return dhidden.to(ctx.hidden_dtype), dweight.to(ctx.weight_dtype), *nones


def _apply_eagerly(*args):
    """`_LinearCrossEntropy.apply`, never traced by Dynamo (the FP8 loss: `linear_cross_entropy`).
    The disabled wrapper is made only while compiling: `torch.compiler.disable` imports Dynamo
    (and with it Triton), which the CPU paths must not (tests/kernels/test_imports.py)."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_LinearCrossEntropy.apply)(*args)
    return _LinearCrossEntropy.apply(*args)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    chunk_size: int = 4096,
    grad_in_forward: bool | None = None,
    backend: str = "auto",
    fp8: bool = False,
    fp8_group_rows: int = WGRAD_GROUP_ROWS,
    fp8_fast_accum: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` (``-100`` ignored), weighted by
    ``loss_mask`` (0/1 or real weights), normalised by the sum of the weights (at least 1). Any
    other label outside ``[0, V)`` makes the loss and its row's gradients NaN (checked on the
    device, without a synchronisation; ``F.cross_entropy`` raises instead).

    Never builds more than ``[chunk_size, V]`` logits at a time (in the matmul dtype on the Triton
    path, float32 on the PyTorch path). ``grad_in_forward`` defaults to "a gradient will be
    needed". ``backend``: ``"auto"`` (Triton row kernel on CUDA when Triton imports, PyTorch
    elsewhere), ``"torch"`` or ``"triton"``. The matmuls run in the autocast dtype when autocast
    is on (as ``hidden @ weight.T`` would), else in the promoted dtype of the two inputs;
    gradients come back in each input's own dtype.

    ``fp8``: all three products (logits, hidden gradient, weight gradient) from float8 operands
    with one power-of-two scale per tensor (FP8 tensor cores where the GPU has them, else the
    same roundings with float32 products), BF16 compute only: ``hidden`` and ``weight`` in e4m3,
    the logit gradient in e4m3 for the hidden gradient and in e5m2 for the weight gradient, both
    written by the pass that computes it (see `_fp8_loss_and_grads`). ``fp8_group_rows``: rows per
    scale group of the hidden states and per weight-gradient product (rounded down to whole
    chunks, at least one): larger groups mean fewer [V, h] accumulations and V bytes more memory
    per row (the group's transposed logit gradient). ``fp8_fast_accum``: the logits' and weight
    gradient's FP8 products accumulate in the tensor cores' own accumulator (faster; the hidden
    gradient's, over the vocabulary, never does; see `nemotron.kernels.fp8`).
    """
    _check(hidden, weight, labels, loss_mask, chunk_size)
    if fp8_group_rows < 1:
        raise ValueError(f"linear_cross_entropy: fp8_group_rows must be positive, got {fp8_group_rows}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"linear_cross_entropy: backend must be auto, torch or triton, got {backend!r}")
    if backend == "auto":
        triton = use_triton(hidden)
    else:
        triton = backend == "triton"
        if triton and not (hidden.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            # (Triton's own answer, "0 active drivers", names neither the tensor nor the flag)
            raise ValueError(
                "linear_cross_entropy: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 "
                f"on CPU), got hidden on {hidden.device}; backend='auto' picks the PyTorch path there"
            )
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        compute = torch.get_autocast_dtype(device)
    else:
        compute = torch.promote_types(hidden.dtype, weight.dtype)
    if fp8 and compute != torch.bfloat16:
        raise ValueError(f"linear_cross_entropy: fp8 needs bf16 compute, got {compute}")
    token_w, denom = _token_weights(labels, loss_mask)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if grad_in_forward is None:
        grad_in_forward = needs_grad
    # the Fp8HeadWeight keys the reuse of the weight's FP8 copies on the parameter itself (inside
    # the autograd function `weight` is a fresh detached view on every call)
    fp8_weight = Fp8HeadWeight(weight) if fp8 else None
    # Under torch.compile (`train.compile`) the FP8 loss runs eagerly, behind a graph break:
    # Dynamo refused to trace it ("An intermediate tensor 'dweight' created inside a
    # higher-order op subgraph aliases an input or output"), and it keeps per-pass state on
    # Python objects (`Fp8HeadWeight`, the step's weight-reuse cache) that a graph must not
    # capture. Its work is GEMMs and custom kernels either way; the BF16 loss stays traced.
    apply = _apply_eagerly if fp8 else _LinearCrossEntropy.apply
    return apply(
        hidden,
        weight,
        labels,
        token_w,
        denom,
        chunk_size,
        bool(grad_in_forward),
        triton,
        compute,
        fp8_weight,
        fp8_group_rows,
        fp8_fast_accum,
    )
