"""Gated grouped RMSNorm reference semantics (the Triton path is checked in test_triton_interpret)."""

import pytest
import torch
import torch.nn.functional as F

from nemotron.kernels.rmsnorm import gated_rmsnorm, gated_rmsnorm_reference, rmsnorm, rmsnorm_reference


def test_gated_grouped_matches_explicit_formula():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    z = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    w = torch.randn(8, generator=gen, dtype=torch.float64)
    out = gated_rmsnorm_reference(y, z, w, group_size=4, eps=1e-5)
    h = y * z * torch.sigmoid(z)
    for g in range(2):
        part = h[..., 4 * g : 4 * g + 4]
        want = part / torch.sqrt((part**2).mean(-1, keepdim=True) + 1e-5) * w[4 * g : 4 * g + 4]
        torch.testing.assert_close(out[..., 4 * g : 4 * g + 4], want)


def test_groups_are_independent():
    y = torch.randn(4, 8, dtype=torch.float64)
    z = torch.randn(4, 8, dtype=torch.float64)
    w = torch.ones(8, dtype=torch.float64)
    base = gated_rmsnorm_reference(y, z, w, 4)
    y2 = y.clone()
    y2[:, 4:] *= 10
    torch.testing.assert_close(gated_rmsnorm_reference(y2, z, w, 4)[:, :4], base[:, :4])


def test_plain_rmsnorm_and_cpu_dispatch():
    x = torch.randn(5, 6)
    w = torch.randn(6)
    torch.testing.assert_close(
        rmsnorm_reference(x, w), F.rms_norm(x, (6,), w, eps=1e-5), rtol=1e-5, atol=1e-6
    )
    assert torch.equal(rmsnorm(x, w), rmsnorm_reference(x, w))
    z = torch.randn(5, 6)
    assert torch.equal(gated_rmsnorm(x, z, w, 3), gated_rmsnorm_reference(x, z, w, 3))


def test_bad_group_size_raises():
    with pytest.raises(ValueError, match="group_size"):
        gated_rmsnorm_reference(torch.zeros(2, 6), None, torch.ones(6), 4)
    with pytest.raises(ValueError, match="weight"):
        gated_rmsnorm_reference(torch.zeros(2, 6), None, torch.ones(5), 3)
