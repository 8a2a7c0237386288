"""Aux-loss-free MoE load balancing (DeepSeek-V3 style, docs/reference.md §2).

Each MoE router counts the tokens it routes to each expert during grad-enabled forwards. Once
per optimiser step, after every micro-batch, the counts are summed over the ranks that saw
different tokens, every layer's bias moves by `rate * sign(mean - count)` (under-loaded experts
up, over-loaded down), and the counters are reset. Summing over extra ranks that saw the same
tokens (e.g. tensor-parallel peers) scales all counts of a layer alike and leaves the sign
unchanged, so the default group (every rank) is always safe when each rank holds every MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class BalanceStats:
    """Per-layer load figures of one optimiser step (before the counters were reset)."""

    max_over_mean: list[float] = field(default_factory=list)  # max expert load / mean load
    bias_min: list[float] = field(default_factory=list)
    bias_max: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)  # routed token-slots counted per layer

    @property
    def worst_max_over_mean(self) -> float:
        return max(self.max_over_mean, default=0.0)

    @property
    def mean_max_over_mean(self) -> float:
        return sum(self.max_over_mean) / len(self.max_over_mean) if self.max_over_mean else 0.0

    @property
    def bias_range(self) -> float:
        if not self.bias_min:
            return 0.0
        return max(self.bias_max) - min(self.bias_min)

    def summary(self) -> dict[str, float]:
        return {
            "balance/max_over_mean": self.worst_max_over_mean,
            "balance/mean_max_over_mean": self.mean_max_over_mean,
            "balance/bias_range": self.bias_range,
        }


def update_expert_biases(moe_layers, rate: float, group=None) -> BalanceStats:
    """Apply one bias update to every MoE layer from its accumulated counts; reset the counts.

    `moe_layers` are modules with `.router.expert_bias` and `.router.tokens_per_expert`.
    `group`: process group whose counts are summed (default: all ranks, when distributed).
    """
    layers = list(moe_layers)
    stats = BalanceStats()
    if not layers:
        return stats
    with torch.no_grad():
        # float64: at the recipe's scale a layer routes ~151M token-slots per step, beyond
        # float32's exact integers (2^24), and a float32 mean can land on an expert's count (or
        # miss it), turning sign(mean - count) into 0 (or +-1) for an expert at the mean.
        # float64 holds every sum exactly, so the sign is the exact one.
        counts = torch.stack([layer.router.tokens_per_expert.double() for layer in layers])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        mean = counts.mean(dim=1, keepdim=True)
        deltas = rate * torch.sign(mean - counts)
        for layer, delta in zip(layers, deltas):
            bias = layer.router.expert_bias
            bias.add_(delta.to(device=bias.device, dtype=bias.dtype))
            layer.router.tokens_per_expert.zero_()
        max_over_mean = torch.where(
            mean.squeeze(1) > 0,
            counts.max(dim=1).values / mean.squeeze(1).clamp_min(1e-12),
            torch.zeros_like(mean.squeeze(1)),
        )
        biases = torch.stack([layer.router.expert_bias.float() for layer in layers])
        stats.max_over_mean = max_over_mean.tolist()
        stats.bias_min = biases.min(dim=1).values.tolist()
        stats.bias_max = biases.max(dim=1).values.tolist()
        stats.tokens = counts.sum(dim=1).tolist()
    return stats


def reset_expert_counts(moe_layers) -> None:
    """Drop counts without updating biases (e.g. after a skipped, non-finite step)."""
    with torch.no_grad():
        for layer in moe_layers:
            layer.router.tokens_per_expert.zero_()
