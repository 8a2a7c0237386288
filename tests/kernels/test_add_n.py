"""add_n: the fp32 sum of two or three gradients, rounded once; argument checks; CPU dispatch."""

import pytest
import torch

from nemotron.kernels import add_n as add_n_module
from nemotron.kernels.add_n import add_n, add_n_reference


def test_add_n_sums_in_fp32_and_rounds_once():
    a = torch.tensor([1.0, 2.0**-9, -3.0])  # fp32 (the router's gradient)
    b = torch.tensor([3 * 2.0**-10, 2.0**-9, 1.0]).bfloat16()
    c = torch.tensor([3 * 2.0**-10, 1.0, 2.0]).bfloat16()
    out = add_n([a, b, c], torch.bfloat16)
    assert out.dtype == torch.bfloat16
    want = (a + b.float() + c.float()).bfloat16()
    assert torch.equal(out, want)
    # 1 + 0.75 ulp rounds up once; bf16 adds one at a time lose each 0.375 ulp on its own
    assert out[0].item() == 1.0 + 2.0**-7 and ((a.bfloat16() + b) + c)[0].item() == 1.0
    assert not add_n_module._use_triton([a, b, c])


def test_add_n_float64_and_two_inputs():
    a = torch.randn(3, 4, dtype=torch.float64)
    b = torch.randn(3, 4, dtype=torch.float32)
    torch.testing.assert_close(add_n([a, b], torch.float64), a + b.double(), rtol=0, atol=0)


def test_add_n_argument_errors():
    with pytest.raises(ValueError, match="two or three"):
        add_n_reference([torch.zeros(2)], torch.float32)
    with pytest.raises(ValueError, match="shapes"):
        add_n([torch.zeros(2), torch.zeros(3)], torch.float32)
