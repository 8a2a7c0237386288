"""MoE routing after the router GEMM: sigmoid scores, top-k experts by biased score, and the
combine weights (unbiased scores of the chosen experts, renormalised, times the scaling factor).

``route_topk`` runs the Triton kernels (``nemotron.kernels.moe_router_triton``: forward one read
of the logits, the top-k found in registers, scores / indices / weights written once; backward
one pass giving the logits' gradient from the scores' and the weights' gradients) on CUDA when
Triton imports and fast paths are on, else ``route_topk_reference`` (PyTorch ops: about eight
kernels forward and ten backward, each a launch of a few microseconds on [tokens x experts]).

The expert bias only chooses the experts (aux-loss-free balancing); it gets no gradient.
"""

from __future__ import annotations

import torch

from nemotron.kernels import use_triton

__all__ = [
    "check_top_k",
    "route_topk",
    "route_topk_reference",
    "route_topk_triton",
    "top_k_experts",
    "WEIGHT_EPS",
]

# Added to the sum of the chosen scores before dividing (sigmoid scores are > 0; this only
# guards a sum that underflows).
WEIGHT_EPS = 1e-20


def check_top_k(top_k: int, num_experts: int) -> None:
    """Every token takes `top_k` distinct experts: 1 <= top_k <= num_experts, else ValueError.
    (A sort's slice would silently give fewer columns, or none: a token routed nowhere.)"""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"route_topk: top_k={top_k!r} must be an integer in [1, {num_experts}] (the number of experts)"
        )


def top_k_experts(values: torch.Tensor, top_k: int) -> torch.Tensor:
    """The indices of the `top_k` largest of `values` [..., experts], in descending order, the
    lower expert index first among equal values (the Triton kernel's rule).

    A stable descending sort, not torch.topk: torch.topk leaves the order among equal values
    unspecified (on CPU it picks e.g. 4, 7, 5 of four equal values), so with ties (scores
    saturated at 1.0, equal router rows, an all-zero router) two paths, or two devices, would
    route the same token to different experts."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :top_k]


def route_topk_reference(
    logits: torch.Tensor, expert_bias: torch.Tensor, top_k: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [tokens, experts] float32 -> (scores [tokens, experts] float32, topk_idx [tokens, k]
    int64 in descending biased score, the lower expert index first among equal ones,
    topk_weight [tokens, k] float32)."""
    check_top_k(top_k, logits.shape[-1])
    scores = torch.sigmoid(logits)
    with torch.no_grad():
        topk_idx = top_k_experts(scores + expert_bias, top_k)
    weights = scores.gather(-1, topk_idx)
    weights = weights / (weights.sum(-1, keepdim=True) + WEIGHT_EPS) * scale
    return scores, topk_idx, weights


def route_topk_triton(
    logits: torch.Tensor, expert_bias: torch.Tensor, top_k: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`route_topk_reference` with the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""
    # Triton is optional: imported when a kernel first runs (see nemotron.kernels)
    from nemotron.kernels.moe_router_triton import RouteTopKFunction

    return RouteTopKFunction.apply(logits, expert_bias, top_k, float(scale))


def _use_triton(logits: torch.Tensor) -> bool:
    """The package's dispatch rule (`nemotron.kernels.use_triton`), and the kernel's input:
    2-D float32 logits."""
    return logits.dtype == torch.float32 and logits.dim() == 2 and use_triton(logits)


def route_topk(
    logits: torch.Tensor, expert_bias: torch.Tensor, top_k: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The routing the MoE router calls: Triton on CUDA, the reference elsewhere."""
    if _use_triton(logits):
        return route_topk_triton(logits, expert_bias, top_k, scale)
    return route_topk_reference(logits, expert_bias, top_k, scale)
