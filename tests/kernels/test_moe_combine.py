"""The MoE combine reference: definition (float64), gradients, and argument checks."""

import pytest
import torch

from nemotron.kernels.moe_combine import weighted_combine, weighted_combine_reference


def _route(tokens, k, experts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    order = torch.argsort(idx.reshape(-1), stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    return order, position


def test_combine_matches_per_token_sum_and_gradcheck():
    tokens, k, hidden = 5, 3, 4
    order, position = _route(tokens, k, 6)
    rows = torch.randn(tokens * k, hidden, dtype=torch.float64, requires_grad=True)
    w = torch.rand(tokens, k, dtype=torch.float64, requires_grad=True)
    y = weighted_combine(rows, order, position, w)
    want = torch.stack([sum(w[t, s] * rows[position[t * k + s]] for s in range(k)) for t in range(tokens)])
    torch.testing.assert_close(y, want)
    assert torch.autograd.gradcheck(
        lambda r, ww: weighted_combine_reference(r, order, position, ww), (rows, w)
    )
    # `order` may be omitted: derived from `position` for the row gradient
    assert torch.autograd.gradcheck(
        lambda r: weighted_combine_reference(r, None, position, w.detach()), (rows,)
    )


def test_combine_adds_the_addend_with_identity_gradient():
    tokens, k, hidden = 4, 2, 3
    order, position = _route(tokens, k, 5, seed=1)
    rows = torch.randn(tokens * k, hidden, dtype=torch.float64, requires_grad=True)
    w = torch.rand(tokens, k, dtype=torch.float64, requires_grad=True)
    add = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(
        weighted_combine(rows, order, position, w, add), weighted_combine(rows, order, position, w) + add
    )
    assert torch.autograd.gradcheck(
        lambda r, ww, a: weighted_combine_reference(r, order, position, ww, a), (rows, w, add)
    )
    with pytest.raises(ValueError, match="add must be"):
        weighted_combine(rows, order, position, w, add[:, :2])


def test_combine_shape_error():
    with pytest.raises(ValueError, match="weighted_combine"):
        weighted_combine(torch.randn(5, 4), None, torch.arange(6), torch.rand(2, 3))
