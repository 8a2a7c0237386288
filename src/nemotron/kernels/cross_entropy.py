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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemotron.kernels import use_triton
from nemotron.kernels.dense import dense_inputs
from nemotron.kernels.fp8 import (
    compiled,
    emulated_mm,
    fp8_hardware,
    quantize_columns,
    quantized_weight,
    rowwise,
    scaled_mm,
)

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "IGNORE_INDEX"]

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
    lse = torch.logsumexp(logits, dim=-1)
    loss = lse - logits.gather(1, labels[:, None])[:, 0]
    grad = None
    if row_scale is not None:
        # In place: logits -> row_scale * (softmax(logits) - onehot(labels)).
        probs = logits.sub_(lse[:, None]).exp_()
        probs.scatter_add_(1, labels[:, None], -torch.ones_like(lse[:, None]))
        grad = probs.mul_(row_scale.to(probs.dtype)[:, None]).to(lowp)
    return loss, lse, grad


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
    """The FP8 copies of one LM head weight: per vocabulary row (the logits' product) and per
    hidden column (the input gradient's), each made on first use and reused within a
    `kernels.fp8.reuse_quantized_weights` scope under the identity of the weight parameter
    `param` (`linear_cross_entropy(fp8=True)` makes one per call)."""

    def __init__(self, param: torch.Tensor) -> None:
        self.param = param
        self._made: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # within one pass

    def rows(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "rows" not in self._made:
            self._made["rows"] = quantized_weight(self.param, "lm_head.rows", w, rowwise)
        return self._made["rows"]

    def columns(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "columns" not in self._made:
            quantize = compiled("lm_head_columns", quantize_columns, w.device)
            self._made["columns"] = quantized_weight(self.param, "lm_head.columns", w, quantize)
        return self._made["columns"]

    def release(self) -> None:
        """Drop this pass's references (a reuse scope keeps its own)."""
        self._made.clear()


def _head_products(w: torch.Tensor, fp8: Fp8HeadWeight | None):
    """(hidden chunk -> logits, logit gradient -> hidden gradient) for the LM head weight w
    [V, h] in the compute dtype. FP8: both products on float8 operands with one scale per row
    (hidden and logit-gradient rows; w per vocabulary row for the logits, per hidden column for
    the input gradient, made once: `Fp8HeadWeight`); BF16 results. The weight gradient always
    stays in the compute dtype (see `linear_cross_entropy`)."""
    if fp8 is None:
        return (lambda h: h @ w.t()), (lambda g: g @ w)
    mm = scaled_mm if fp8_hardware(w.device) else emulated_mm

    def logits_of(h: torch.Tensor) -> torch.Tensor:
        h_q, h_inv = rowwise(h)
        return mm(h_q, h_inv, *fp8.rows(w))

    def input_grad_of(g: torch.Tensor) -> torch.Tensor:
        g_q, g_inv = rowwise(g)
        return mm(g_q, g_inv, *fp8.columns(w))

    return logits_of, input_grad_of


class _LinearCrossEntropy(torch.autograd.Function):
    # Matmuls run in `compute` dtype with autocast off (autocast's choice is made by the caller),
    # so forward and backward agree whether or not the backward runs under autocast.
    @staticmethod
    @dense_inputs
    def forward(
        ctx, hidden, weight, labels, token_w, denom, chunk_size, grad_in_forward, use_triton, compute, fp8
    ):
        n = hidden.shape[0]
        acc = torch.float64 if compute == torch.float64 else torch.float32
        rows = _rows_triton if use_triton else _rows_torch
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(compute), weight.to(compute)
            logits_of, input_grad_of = _head_products(w, fp8)
            total = torch.zeros((), dtype=acc, device=hidden.device)
            safe_labels = labels.clamp_min(0)
            token_w = token_w.to(acc)
            inv_denom = 1.0 / denom.to(acc)
            dhidden = dweight = None
            if grad_in_forward:
                dhidden = torch.empty_like(h_all)
                dweight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
            for s in range(0, n, chunk_size):
                e = min(n, s + chunk_size)
                scale = token_w[s:e] * inv_denom if grad_in_forward else None
                loss, _, grad = rows(logits_of(h_all[s:e]), safe_labels[s:e], scale)
                total += (loss.to(acc) * token_w[s:e]).sum()
                if grad_in_forward:
                    dhidden[s:e] = input_grad_of(grad)
                    _accumulate_weight_grad(dweight, grad, h_all[s:e])
            if fp8 is not None:
                fp8.release()  # not held until backward
        ctx.chunk_size = chunk_size
        ctx.grad_in_forward = grad_in_forward
        ctx.use_triton = use_triton
        ctx.compute = compute
        ctx.fp8 = fp8
        if grad_in_forward:
            ctx.save_for_backward(dhidden, dweight)
        else:
            ctx.save_for_backward(hidden, weight, safe_labels, token_w, inv_denom)
        return total * inv_denom

    @staticmethod
    @dense_inputs
    def backward(ctx, grad_out):
        nones = (None,) * 8
        if ctx.grad_in_forward:
            dhidden, dweight = ctx.saved_tensors
            g = grad_out.to(dweight.dtype)
            return (
                (dhidden * g.to(dhidden.dtype)).to(ctx.hidden_dtype),
                (dweight * g).to(ctx.weight_dtype),
                *nones,
            )
        hidden, weight, labels, token_w, inv_denom = ctx.saved_tensors
        rows = _rows_triton if ctx.use_triton else _rows_torch
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(ctx.compute), weight.to(ctx.compute)
            logits_of, input_grad_of = _head_products(w, ctx.fp8)
            dhidden = torch.empty_like(h_all)
            dweight = torch.zeros(weight.shape, dtype=token_w.dtype, device=weight.device)
            scale_all = token_w * (inv_denom * grad_out.to(token_w.dtype))
            for s in range(0, hidden.shape[0], ctx.chunk_size):
                e = min(hidden.shape[0], s + ctx.chunk_size)
                _, _, grad = rows(logits_of(h_all[s:e]), labels[s:e], scale_all[s:e])
                dhidden[s:e] = input_grad_of(grad)
                _accumulate_weight_grad(dweight, grad, h_all[s:e])
        return dhidden.to(ctx.hidden_dtype), dweight.to(ctx.weight_dtype), *nones


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    chunk_size: int = 4096,
    grad_in_forward: bool | None = None,
    backend: str = "auto",
    fp8: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` (``-100`` ignored), weighted by
    ``loss_mask`` (0/1 or real weights), normalised by the sum of the weights (at least 1).

    Never builds more than ``[chunk_size, V]`` logits at a time (in the matmul dtype on the Triton
    path, float32 on the PyTorch path). ``grad_in_forward`` defaults to "a gradient will be
    needed". ``backend``: ``"auto"`` (Triton row kernel on CUDA when Triton imports, PyTorch
    elsewhere), ``"torch"`` or ``"triton"``. The matmuls run in the autocast dtype when autocast
    is on (as ``hidden @ weight.T`` would), else in the promoted dtype of the two inputs;
    gradients come back in each input's own dtype.

    ``fp8``: the logits and the hidden gradient from float8 e4m3 operands with one scale per row
    (``nemotron.kernels.fp8``; FP8 tensor cores where the GPU has them, else the same roundings
    with float32 products), BF16 compute only; the weight gradient stays BF16 (its operands would
    need a second, column-wise quantization of every chunk's [chunk, V] logit gradient).
    """
    _check(hidden, weight, labels, loss_mask, chunk_size)
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"linear_cross_entropy: backend must be auto, torch or triton, got {backend!r}")
    if backend == "auto":
        triton = use_triton(hidden)
    else:
        triton = backend == "triton"
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
    return _LinearCrossEntropy.apply(
        hidden, weight, labels, token_w, denom, chunk_size, bool(grad_in_forward), triton, compute, fp8_weight
    )
