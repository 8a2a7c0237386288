"""FP8 (e4m3) quantization with one scale per row, the rowwise-scaled products that use it, and
the reuse of quantized weights within one optimizer step.

Shared by the FP8 paths this project writes itself (`nemotron.train.fp8_grouped`: the routed
experts; `nemotron.kernels.cross_entropy`: the LM head). `quantize_rows` is the reference (a
few PyTorch ops); `rowwise` is what those paths call: on GPUs with FP8 tensor cores the
one-pass Triton kernel (`nemotron.kernels.fp8_triton`) for rows up to `MAX_ROW` elements
(Triton converts to e4m3 only from compute capability 8.9), `torch.compile` of the reference
(`compiled`) for wider rows and other GPUs, elsewhere the reference eagerly. `emulated_mm`
computes the FP8 products' roundings with float32 products (CPU tests, GPUs without FP8
tensor cores).

Scales are `448 / amax(row)` rounded down to a power of two (its float32 mantissa bits cleared,
exact), as torchao's rowwise recipe does: the inverse scale the GEMM multiplies by is exact, and
the largest element of a row lands in [224, 448] (e4m3's largest finite value is 448).

Weights change only at the optimizer step, so within one step (every micro-batch's forward and
backward) their quantized copies are the same: inside `reuse_quantized_weights()` (opened by
`train.loop.train_step` around one step's passes, closed before the optimizer step)
`quantized_weight` makes each copy once and hands it back on later calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from nemotron.kernels import use_triton

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = float(torch.finfo(FLOAT8).max)  # 448
# e5m2: 2 mantissa bits but 2^32 of range (largest 57344, smallest subnormal 2^-16), for
# gradients whose elements span many orders of magnitude (the LM head's softmax tails)
FLOAT8_WIDE = torch.float8_e5m2
FLOAT8_WIDE_MAX = float(torch.finfo(FLOAT8_WIDE).max)  # 57344
QUANT_EPS = 1e-12  # the amax of an all-zero row (its values quantize to zero)
EXPONENT_BITS = 0x7F800000  # float32 sign 0, exponent all ones, mantissa 0
# torch._scaled_mm / _scaled_grouped_mm: both GEMM dimensions of an operand multiples of 16;
# the grouped GEMM also needs each expert's row group aligned to 16 rows.
FP8_ALIGN = 16

__all__ = [
    "FLOAT8",
    "FLOAT8_WIDE",
    "FP8_ALIGN",
    "compiled",
    "emulated_mm",
    "fp8_hardware",
    "quantize_rows",
    "quantized_weight",
    "reuse_quantized_weights",
    "rowwise",
    "scale_for",
    "scaled_mm",
    "tensorwise_mm",
    "quantize_tensor",
    "quantize_transposed",
    "relu2_backward",
    "relu2_backward_rows",
    "quantize_rows_to",
    "rowwise_to",
]


def fp8_hardware(device: torch.device) -> bool:
    """True on CUDA devices with FP8 tensor cores (compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (float8 e4m3 [..., K] contiguous, float32 inverse scales [...]), one scale
    per row over the last dimension (the reference; `rowwise` is the fast dispatch)."""
    xf = x.float()
    # NaN elements stay NaN (the clamp keeps them) but do not set their row's scale
    amax = xf.abs().nan_to_num(nan=0.0, posinf=float("inf")).amax(dim=-1, keepdim=True).clamp(min=QUANT_EPS)
    scale = power_of_two_floor(FLOAT8_MAX / amax)
    q = (xf * scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8)
    return q.contiguous(), (1.0 / scale).squeeze(-1)


def power_of_two_floor(r: torch.Tensor) -> torch.Tensor:
    """The largest power of two <= r, for positive normal float32 r: r with its mantissa bits
    cleared (exact; `exp2(floor(log2(r)))` can round up just below a power of two)."""
    return (r.view(torch.int32) & EXPONENT_BITS).view(torch.float32)


def scale_for(amax: torch.Tensor, dtype: torch.dtype = FLOAT8) -> torch.Tensor:
    """The float32 scale that maps `amax` (>= 0, any shape) to at most `dtype`'s largest value:
    `max / amax` rounded down to a power of two (exact descale), `QUANT_EPS` for amax 0."""
    return power_of_two_floor(torch.finfo(dtype).max / amax.float().clamp(min=QUANT_EPS))


def quantize_tensor(
    x: torch.Tensor, dtype: torch.dtype = FLOAT8, transposed_cols: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """x [M, K] -> (float8 [M, K] contiguous, float8 [K, transposed_cols] contiguous or None,
    float32 0-dim inverse scale), one scale for the whole tensor (same rule as `quantize_rows`).
    `transposed_cols` (>= M): also the transposed copy, zero beyond column M (pads the
    contraction dimension of a product over the rows of x to a multiple of 16)."""
    xf = x.float()
    scale = scale_for(xf.abs().nan_to_num(nan=0.0, posinf=float("inf")).amax(), dtype)
    fmax = torch.finfo(dtype).max
    q = (xf * scale).clamp(-fmax, fmax).to(dtype)
    qt = None
    if transposed_cols == x.shape[0]:
        qt = q.t().contiguous()
    elif transposed_cols is not None:
        qt = torch.zeros(x.shape[1], transposed_cols, dtype=dtype, device=x.device)
        qt[:, : x.shape[0]] = q.t()
    return q, qt, 1.0 / scale


def relu2_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows(relu(x)^2), the squared ReLU in float32 and never stored."""
    return quantize_rows(torch.relu(x.float()).square())


def relu2_backward_rows(
    h_pre: torch.Tensor, grad_h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The squared ReLU's backward for FP8 weight gradients (reference): (quantize_rows(h) with
    h = relu(h_pre)^2 in float32, the forward's FP8 form of h again; quantize_rows(dh_pre) with
    dh_pre = grad_h * 2 relu(h_pre) rounded to h_pre's dtype first), nothing kept in BF16.
    `relu2_backward` is the fast dispatch."""
    r = torch.relu(h_pre.float())
    h_q, h_inv = quantize_rows(r.square())
    dh_pre = (grad_h.float() * 2.0 * r).to(h_pre.dtype)
    dh_q, dh_inv = quantize_rows(dh_pre)
    return h_q, h_inv, dh_q, dh_inv


def relu2_backward(
    h_pre: torch.Tensor, grad_h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`relu2_backward_rows` the fast way for the device: the one-pass Triton kernel on GPUs with
    FP8 tensor cores for rows up to `fp8_triton.MAX_ROW` elements (one read of h_pre and grad_h, one byte written
    per element and form), else the reference (compiled on CUDA). Same values either way."""
    if use_triton(h_pre, grad_h) and fp8_hardware(h_pre.device):
        from nemotron.kernels.fp8_triton import MAX_ROW, relu2_backward_rows_triton

        if 0 < h_pre.shape[-1] <= MAX_ROW:
            return relu2_backward_rows_triton(h_pre, grad_h)
    return compiled("relu2_backward_rows", relu2_backward_rows, h_pre.device)(h_pre, grad_h)


def quantize_transposed(w: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] and one power-of-two inverse scale per matrix inv [...] -> (float8 e4m3
    [..., K, N] contiguous, float32 inverse scales [..., K]: the matrix's, repeated). What the
    input-gradient product needs of a weight quantized per row for the forward: with `inv` the
    largest of the matrix's `quantize_rows` inverse scales (`inv_rows.amax(-1)`), which is
    exactly the scale of the whole matrix's amax, no second reduction over the weight is needed
    and the pass is one read and one transposed write."""
    scale = 1.0 / inv.float()  # exact: a power of two
    q = (w.float() * scale[..., None, None]).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8)
    return q.transpose(-2, -1).contiguous(), inv.float()[..., None].expand(
        *inv.shape, w.shape[-1]
    ).contiguous()


def rowwise(x: torch.Tensor, relu2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(x)` (`relu2_rows(x)` with `relu2`) the fast way for `x`'s device: the
    one-pass Triton kernel on GPUs with FP8 tensor cores for rows up to `fp8_triton.MAX_ROW`
    elements, else the reference (compiled on CUDA). Same values either way."""
    if use_triton(x) and fp8_hardware(x.device):
        from nemotron.kernels.fp8_triton import MAX_ROW, quantize_rows_triton

        if 0 < x.shape[-1] <= MAX_ROW:
            return quantize_rows_triton(x, relu2=relu2)
    if relu2:
        return compiled("relu2_rows", relu2_rows, x.device)(x)
    return compiled("rows", quantize_rows, x.device)(x)


def quantize_rows_to(x: torch.Tensor, position: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, K] quantized per row and each row written to k places: (float8 [tokens*k, K],
    float32 [tokens*k]) with row position[t*k + s] = quantize_rows(x)[t] for every slot s (the
    reference). The MoE dispatch of FP8 rows (`train.fp8_dispatch`): every copy of a token's
    row carries the token's own scale. `rowwise_to` is the fast dispatch."""
    q, inv = quantize_rows(x)
    rows_q = torch.empty((position.numel(), x.shape[-1]), dtype=q.dtype, device=x.device)
    rows_inv = torch.empty(position.numel(), dtype=inv.dtype, device=x.device)
    token = torch.arange(position.numel(), device=x.device) // k  # pair p = t*k + s
    rows_q.view(torch.uint8)[position] = q.view(torch.uint8)[token]
    rows_inv[position] = inv[token]
    return rows_q, rows_inv


def rowwise_to(x: torch.Tensor, position: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows_to` the fast way: on GPUs with FP8 tensor cores one Triton pass (each
    token's row read once, quantized, written to its k places), else the reference. Same values."""
    if use_triton(x) and fp8_hardware(x.device):
        from nemotron.kernels.fp8_triton import MAX_ROW, quantize_rows_to_triton

        if 0 < x.shape[-1] <= MAX_ROW:
            return quantize_rows_to_triton(x, position, k)
    return quantize_rows_to(x, position, k)


_COMPILED: dict[str, Callable] = {}


def compiled(name: str, fn: Callable, device: torch.device) -> Callable:
    """`fn` compiled once per process under `name` on CUDA (eager elsewhere). Callers use one
    name per kind of operand: shapes of activations change from call to call (expert
    parallelism's row counts; compiled with automatic dynamic shapes after the first change),
    weights' never do."""
    if device.type != "cuda":
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, fullgraph=True)
    return _COMPILED[name]


def scaled_mm(a_q: torch.Tensor, a_inv: torch.Tensor, b_q: torch.Tensor, b_inv: torch.Tensor) -> torch.Tensor:
    """(a_q * a_inv[:, None]) @ (b_q * b_inv[:, None])^T in BF16 on the FP8 tensor cores:
    a_q [M, K] and b_q [N, K] row-quantized, contiguous."""
    return torch._scaled_mm(a_q, b_q.t(), a_inv[:, None], b_inv[None, :], out_dtype=torch.bfloat16)


# `use_fast_accum` of torch._scaled_mm / _scaled_grouped_mm (`train.fp8.fast_accum`): Hopper's
# FP8 tensor cores accumulate the whole contraction in their own accumulator, which keeps fewer
# bits than float32, instead of the GEMM adding partial sums into float32 registers every few
# k-blocks. Measured on an H200 at the proxy's shapes (docs/benchmarks.md "FP8 training", sixth
# round): the grouped products 12-22% faster, the dense linears' 4-9% (the LM head's within the
# run-to-run spread); the error against the float32 product of the same float8 operands 1.7e-3
# (BF16 output rounding) -> 1.8e-3 to 2.8e-3 for contractions up to ~10k and 4.3e-3 at 24,576,
# far below what rounding the operands to FP8 moves a product (4-7% of its norm against BF16,
# the experts' products). Not for contractions over the vocabulary (the LM head's hidden
# gradient, 131,072 terms): 1.0e-2 there, and slower.


def tensorwise_mm(
    a_q: torch.Tensor,
    a_inv: torch.Tensor,
    b_q: torch.Tensor,
    b_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    fast_accum: bool = False,
) -> torch.Tensor:
    """(a_q * a_inv) @ (b_q * b_inv)^T with one inverse scale per operand (0-dim float32): a_q
    [M, K] and b_q [N, K] float8 (e4m3 or e5m2, not both e5m2), row-major. On the FP8 tensor
    cores where the device has them (float32 accumulation, result rounded to `out_dtype`;
    `fast_accum`: see above), else the same with float32 products."""
    if fp8_hardware(a_q.device):
        return torch._scaled_mm(a_q, b_q.t(), a_inv, b_inv, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return ((a_q.float() @ b_q.float().t()) * (a_inv * b_inv)).to(out_dtype)


def emulated_mm(
    a_q: torch.Tensor, a_inv: torch.Tensor, b_q: torch.Tensor, b_inv: torch.Tensor
) -> torch.Tensor:
    """`scaled_mm` with float32 products, the result rounded to BF16 (any device)."""
    a = a_q.float() * a_inv[:, None]
    b = b_q.float() * b_inv[:, None]
    return (a @ b.t()).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Weight gradients summed over a step's micro-batches where they are computed


class SummedWeightGrads:
    """An open `summed_weight_grads` scope: `buffers` the float32 sums by (owner id, name);
    `last` whether the running micro-batch is the step's last (set by the training loop)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, str], torch.Tensor] = {}
        self.last = True


# Process-wide for the same reason as `_REUSE` below (read by backward passes on autograd's
# device threads).
_SUMS: dict[str, SummedWeightGrads | None] = {"scope": None}


@contextlib.contextmanager
def summed_weight_grads() -> Iterator[SummedWeightGrads]:
    """Inside (a training step whose gradients FSDP2 reduces after the last micro-batch only,
    `train.loop.fsdp_micro_batches`), a weight-gradient product that can add into its output
    (the routed experts' FP8 one, `train.fp8_grouped`) sums each micro-batch's product into one
    float32 buffer per weight, in the product's own pass, and hands autograd the sum at the last
    micro-batch (None before): no per-micro-batch BF16 gradient for FSDP2 to convert and add
    into its float32 sum. Nested scopes share the outermost one."""
    if _SUMS["scope"] is not None:
        yield _SUMS["scope"]
        return
    scope = _SUMS["scope"] = SummedWeightGrads()
    try:
        yield scope
    finally:
        _SUMS["scope"] = None


def summed_weight_grads_scope() -> SummedWeightGrads | None:
    """The open `summed_weight_grads` scope, or None."""
    return _SUMS["scope"]


def grad_without_rows(
    like: torch.Tensor, shape, dtype: torch.dtype, sums: SummedWeightGrads | None, key
) -> torch.Tensor | None:
    """A weight's gradient from a micro-batch without rows: zeros in `dtype`; under an open
    scope (`sums`, summing under `key`) what the weight-gradient product would hand over: the
    float32 sum of the earlier micro-batches at the last one, None before."""
    if sums is None:
        return like.new_zeros(shape, dtype=dtype)
    if not sums.last:
        return None
    summed = sums.buffers.pop(key, None)
    return summed if summed is not None else like.new_zeros(shape, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Quantized weights reused within one optimizer step

# Process-wide, like `kernels.fast_paths`: the backward passes that read it run on autograd's
# device threads, where neither thread-locals nor context variables of the caller are set.
_REUSE: dict[str, dict | None] = {"cache": None}


@contextlib.contextmanager
def reuse_quantized_weights(enabled: bool = True) -> Iterator[None]:
    """Inside, `quantized_weight` quantizes each weight once and returns that copy on later
    calls (the copies are dropped on exit). The weights must not change inside: a training step
    opens it around its forward and backward passes and closes it before the optimizer step.
    Nested scopes share the outermost one's copies."""
    if not enabled or _REUSE["cache"] is not None:
        yield
        return
    _REUSE["cache"] = {}
    try:
        yield
    finally:
        _REUSE["cache"] = None


def quantized_weight(
    owner: object | None, name: str, weight: torch.Tensor, quantize: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize(weight)`, made once per `reuse_quantized_weights` scope for (`owner`, `name`)
    (the module or parameter the weight belongs to, and which quantized form) and reused; made
    on every call outside a scope or without an `owner`."""
    cache = _REUSE["cache"]
    if cache is None or owner is None:
        return quantize(weight)
    key = (id(owner), name)
    hit = cache.get(key)
    if hit is not None and hit[0] is owner and hit[1] == (weight.shape, weight.dtype, weight.device):
        return hit[2]
    value = quantize(weight)
    cache[key] = (owner, (weight.shape, weight.dtype, weight.device), value)
    return value
