"""A float32-accurate linear layer on bf16 tensor cores, for the MoE router.

The router's logits are computed in float32 (docs/reference.md §1): on an H200 a float32 GEMM runs on the
CUDA cores (~50 TFLOP/s), so the router's three GEMMs (forward, input and weight gradients)
took ~0.4 ms of a 10 ms MoE block. Every float32 number is the sum of three bfloat16 numbers
to within 2^-24 of its value (`split_bf16`), and the product of two bfloat16 numbers is exact
in float32, so a float32 GEMM equals a sum of bfloat16 GEMMs with float32 accumulation
(`torch.mm(..., out_dtype=torch.float32)`), all of them folded into one GEMM by concatenating
the terms along the contracted or an outer dimension. Operands already in bfloat16 (the
activations; the weight when FSDP2 hands the blocks bf16 compute weights) are one exact term.
Pairs whose two terms are both small (i + j > 2, below 2^-24 of the product) are dropped.

`fp32_linear(x, weight)` runs this on CUDA with fast paths on (plain tensors; DTensors take the
reference), else
`fp32_linear_reference` (`F.linear` on float32 copies). Both return float32 logits and give
gradients in the inputs' dtypes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemotron.kernels import fast_paths_enabled

__all__ = ["fp32_linear", "fp32_linear_reference", "split_bf16"]

TERMS = 3  # bf16 terms of a float32 operand (3 x 8 significand bits >= float32's 24)


def split_bf16(t: torch.Tensor) -> list[torch.Tensor]:
    """bfloat16 tensors whose float32 sum equals `t` (one term if `t` is bfloat16, else three,
    the last within 2^-24 relative of t's value)."""
    if t.dtype == torch.bfloat16:
        return [t]
    rest = t.float()
    terms = []
    for _ in range(TERMS):
        term = rest.bfloat16()
        terms.append(term)
        rest = rest - term.float()
    return terms


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for bfloat16 operands with float32 output and accumulation."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # exact products too; the CPU has no mixed-dtype mm


def _pairs(n_a: int, n_b: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n_a) for j in range(n_b) if i + j < TERMS]


def _split_mm(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """sum over kept pairs of a[i] @ b[j] as one bf16 GEMM, whichever layout moves fewer bytes:
    the pairs concatenated along the contracted dimension (operands copied once per pair), or,
    when one side is a single term, the other side's terms stacked along its outer dimension
    (a float32 output per term, summed after)."""
    pairs = _pairs(len(a), len(b))
    (m, k), n = a[0].shape, b[0].shape[1]
    contracted_bytes = (m * k + k * n) * len(pairs) * 2
    if len(a) == 1 and m * n * len(b) * 8 < contracted_bytes:  # [M, K] @ [K, n*N]
        out = _mm_fp32(a[0], torch.cat(b, dim=1))
        return out.view(m, len(b), n).sum(1) if len(b) > 1 else out
    if len(b) == 1 and m * n * len(a) * 8 < contracted_bytes:  # [n*M, K] @ [K, N]
        out = _mm_fp32(torch.cat(a, dim=0), b[0])
        return out.view(len(a), m, n).sum(0) if len(a) > 1 else out
    if len(pairs) == 1:
        return _mm_fp32(a[0], b[0])
    return _mm_fp32(torch.cat([a[i] for i, _ in pairs], dim=1), torch.cat([b[j] for _, j in pairs], dim=0))


class _Fp32Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xs, ws = split_bf16(x), split_bf16(weight)
        ctx.save_for_backward(*xs, *ws)
        ctx.n_x = len(xs)
        ctx.dtypes = (x.dtype, weight.dtype)
        return _split_mm(xs, [w.t() for w in ws])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        xs, ws = list(saved[: ctx.n_x]), list(saved[ctx.n_x :])
        gs = split_bf16(grad.float())
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _split_mm(gs, ws).to(ctx.dtypes[0])  # [T, E] @ [E, H]
        if ctx.needs_input_grad[1]:
            grad_w = _split_mm([g.t() for g in gs], xs).to(ctx.dtypes[1])  # [E, T] @ [T, H]
        return grad_x, grad_w


def fp32_linear_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, H] @ weight[E, H]^T in float32, autocast or not."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())


def fp32_linear_emulated(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The float32-accurate bf16 tensor-core path (any device; CPU only for tests)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _Fp32Linear.apply(x, weight)


def _has_mixed_dtype_mm() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("aten::mm.dtype", "CUDA")
    except (AttributeError, RuntimeError):
        return False


def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Float32 logits of x [T, H] against weight [E, H] (see the module docstring)."""
    if (
        x.is_cuda
        and fast_paths_enabled()
        and x.dtype in (torch.bfloat16, torch.float32)
        and weight.dtype in (torch.bfloat16, torch.float32)
        and _has_mixed_dtype_mm()
        and type(x) is torch.Tensor
        and type(weight) in (torch.Tensor, torch.nn.Parameter)
    ):
        return fp32_linear_emulated(x, weight)
    return fp32_linear_reference(x, weight)
