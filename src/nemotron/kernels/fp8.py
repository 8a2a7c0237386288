"""FP8 (e4m3) quantization with one scale per row, and the rowwise-scaled products that use it.

Shared by the FP8 paths this project writes itself (`nemotron.train.fp8_grouped`: the routed
experts; `nemotron.kernels.cross_entropy`: the LM head). The quantization is a few PyTorch ops
that `torch.compile` fuses into one pass on CUDA (`compiled`); elsewhere they run eagerly, and
`emulated_mm` computes the FP8 products' roundings with float32 products (CPU tests, GPUs
without FP8 tensor cores).

Scales are `448 / amax(row)` rounded down to a power of two, as torchao's rowwise recipe does:
the inverse scale the GEMM multiplies by is exact, and the largest element of a row lands in
[224, 448] (e4m3's largest finite value is 448).
"""

from __future__ import annotations

from typing import Callable

import torch

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = float(torch.finfo(FLOAT8).max)  # 448
_EPS = 1e-12  # the amax of an all-zero row (its values quantize to zero)

__all__ = [
    "FLOAT8",
    "compiled",
    "emulated_mm",
    "fp8_hardware",
    "quantize_columns",
    "quantize_rows",
    "scaled_mm",
]


def fp8_hardware(device: torch.device) -> bool:
    """True on CUDA devices with FP8 tensor cores (compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (float8 e4m3 [..., K] contiguous, float32 inverse scales [...]), one scale
    per row over the last dimension."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS)
    scale = torch.exp2(torch.floor(torch.log2(FLOAT8_MAX / amax)))
    q = (xf * scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8)
    return q.contiguous(), (1.0 / scale).squeeze(-1)


def quantize_columns(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> `quantize_rows(w^T)`: [..., K, N] materialised, one scale per column of
    w (over N). What the input-gradient product needs of a weight quantized per row forward."""
    return quantize_rows(w.transpose(-2, -1))


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


def emulated_mm(
    a_q: torch.Tensor, a_inv: torch.Tensor, b_q: torch.Tensor, b_inv: torch.Tensor
) -> torch.Tensor:
    """`scaled_mm` with float32 products, the result rounded to BF16 (any device)."""
    a = a_q.float() * a_inv[:, None]
    b = b_q.float() * b_inv[:, None]
    return (a @ b.t()).to(torch.bfloat16)
