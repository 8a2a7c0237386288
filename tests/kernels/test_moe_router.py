"""The routing reference (definition, gradients) and its dispatch from the MoE router."""

import torch

from nemotron.kernels import moe_router
from nemotron.kernels.moe_router import route_topk_reference


def test_route_topk_reference_definition_and_gradcheck():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(8, dtype=torch.float64)
    bias[7] = 10.0  # expert 7 always wins: the bias chooses, it does not weight
    scores, idx, w = route_topk_reference(logits, bias, 3, 2.5)
    torch.testing.assert_close(scores, torch.sigmoid(logits))
    assert (idx[:, 0] == 7).all()
    chosen = torch.sigmoid(logits).gather(-1, idx)
    torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True) * 2.5)
    torch.testing.assert_close(w.sum(-1), torch.full((5,), 2.5, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x: route_topk_reference(x, bias, 3, 2.5)[2], (logits,))
    assert not moe_router._use_triton(logits.float())  # CPU tensors take the reference


def test_router_calls_the_routing_dispatcher(monkeypatch):
    from nemotron.models.nano3.moe import Router

    calls = []

    def fake_triton(logits, bias, k, scale):
        calls.append((tuple(logits.shape), k, scale))
        return route_topk_reference(logits, bias, k, scale)

    monkeypatch.setattr(moe_router, "_use_triton", lambda logits: True)
    monkeypatch.setattr(moe_router, "route_topk_triton", fake_triton)
    router = Router(16, 8, 2, 2.5, 0.02)
    out = router(torch.randn(4, 16))
    assert calls == [((4, 8), 2, 2.5)]
    assert out.topk_idx.shape == (4, 2) and out.scores.shape == (4, 8)


def test_top_k_outside_one_to_the_number_of_experts_is_refused():
    """A top k above the number of experts (or below 1) is one ValueError, as Megatron-Core's
    `torch.topk` refuses it; the reference's sort slice routed each token to all 4 experts for
    top 6, and to none for top 0 (weights summing to 0), silently."""
    import pytest

    from nemotron.models.nano3.moe import Router

    logits, bias = torch.randn(3, 4), torch.zeros(4)
    for k in (0, 5, -1):
        with pytest.raises(ValueError, match=rf"top_k={k} must be an integer in \[1, 4\]"):
            route_topk_reference(logits, bias, k, 2.5)
        with pytest.raises(ValueError, match=rf"top_k={k} must be an integer in \[1, 4\]"):
            Router(8, 4, k, 2.5, 0.02)
    assert route_topk_reference(logits, bias, 4, 2.5)[1].shape == (3, 4)  # k = E is fine
