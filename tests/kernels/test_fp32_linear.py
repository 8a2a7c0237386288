"""The MoE router's float32-accurate linear from bf16 GEMMs (`kernels/fp32_linear.py`), on CPU:
the emulated path against float64, next to what plain float32 and plain bf16 GEMMs achieve."""

from __future__ import annotations

import pytest
import torch

from nemotron.kernels.fp32_linear import fp32_linear, fp32_linear_emulated, fp32_linear_reference, split_bf16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_split_bf16_sums_back_to_float32():
    t = torch.randn(1000, dtype=torch.float32) * torch.logspace(-20, 20, 1000)
    terms = split_bf16(t)
    assert len(terms) == 3 and all(term.dtype == torch.bfloat16 for term in terms)
    back = sum(term.double() for term in terms)
    assert ((back - t.double()).abs() <= t.double().abs() * 2.0**-24).all()
    assert len(split_bf16(t.bfloat16())) == 1  # a bf16 operand is its own exact term


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_emulated_linear_is_float32_accurate_forward_and_backward(x_dtype, weight_dtype):
    torch.manual_seed(0)
    x = torch.randn(64, 96).to(x_dtype).requires_grad_(True)
    w = (torch.randn(16, 96) * 0.02).to(weight_dtype).requires_grad_(True)
    g = torch.randn(64, 16)  # a float32 output gradient, as the router's sigmoid gives

    out = fp32_linear_emulated(x, w)
    out.backward(g)
    assert out.dtype == torch.float32 and x.grad.dtype == x_dtype and w.grad.dtype == weight_dtype

    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = x64 @ w64.t()
    ref.backward(g.double())
    # float32 GEMMs are the bar: the emulation must stay within a few float32 roundings ...
    x32, w32 = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    fp32 = fp32_linear_reference(x32, w32)
    fp32.backward(g)
    bar = max(_rel(fp32, ref), 1e-7)
    assert _rel(out, ref) < 8 * bar
    if x_dtype == torch.float32:
        assert _rel(x.grad, x64.grad) < 8 * max(_rel(x32.grad, x64.grad), 1e-7)
    if weight_dtype == torch.float32:
        assert _rel(w.grad, w64.grad) < 8 * max(_rel(w32.grad, w64.grad), 1e-7)
    # ... while one bf16 GEMM of bf16-rounded operands is three orders of magnitude worse
    assert (
        _rel((x.detach().bfloat16().float() @ w.detach().bfloat16().float().t()).bfloat16(), ref) > 100 * bar
    )


def test_dispatcher_takes_the_reference_on_cpu():
    x, w = torch.randn(8, 32).bfloat16(), torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp32_linear(x, w)
    assert out.dtype == torch.float32
    assert torch.equal(out, x.float() @ w.t())
