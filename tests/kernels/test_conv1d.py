"""Causal depthwise conv1d reference: the definition, causality, and argument checks."""

import pytest
import torch

from nemotron.kernels.conv1d import causal_conv1d, causal_conv1d_reference


def explicit(x, w, bias, silu):
    b, t, c = x.shape
    k = w.shape[-1]
    y = torch.zeros_like(x) + bias
    for step in range(t):
        for i in range(k):
            src = step - (k - 1) + i
            if src >= 0:
                y[:, step] += w[:, i] * x[:, src]
    return torch.nn.functional.silu(y) if silu else y


@pytest.mark.parametrize("silu", [True, False])
def test_reference_matches_definition_float64(silu):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64)
    got = causal_conv1d_reference(x, w.unsqueeze(1), bias, "silu" if silu else None)
    torch.testing.assert_close(got, explicit(x, w, bias, silu))
    # the dispatcher takes the reference on CPU
    torch.testing.assert_close(causal_conv1d(x, w, bias, "silu" if silu else None), got)


def test_causal_future_steps_do_not_leak():
    x = torch.randn(1, 8, 3, dtype=torch.float64)
    w, bias = torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    y = causal_conv1d_reference(x, w, bias, None)
    x2 = x.clone()
    x2[:, 5:] = 7.0
    torch.testing.assert_close(causal_conv1d_reference(x2, w, bias, None)[:, :5], y[:, :5])


def test_argument_errors():
    x = torch.randn(1, 4, 3)
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d(x, torch.randn(2, 4), None)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, torch.randn(3, 4), None, activation="gelu")
    with pytest.raises(ValueError, match="x must be"):
        causal_conv1d(x[0], torch.randn(3, 4), None)
