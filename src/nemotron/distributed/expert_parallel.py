"""Expert parallelism: the all-to-all token dispatcher.

`AllToAllDispatcher` implements the MoE dispatcher interface of `nemotron.models.nano3`
(`dispatch(x, topk_idx, topk_weight) -> (sorted_x, counts, ctx)`, `combine(expert_out, ctx) -> y`)
for experts split across the ranks of an expert-parallel group: EP rank r holds the contiguous
global experts [r * E/EP, (r+1) * E/EP). Dispatch exchanges the per-expert token counts first
(so every rank knows how much it will receive), then the tokens themselves; the receiving rank
orders them by its local expert, runs its experts, and `combine` sends the outputs back along
the reverse route and restores the original token order. No token is ever dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single with uneven splits (the backward is the reverse route)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                group: dist.ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=recv_splits,
                           input_split_sizes=send_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Send rows `x[sum(send_splits[:j]) : ...]` to rank j of `group`, differentiably."""
    return _AllToAll.apply(x, list(send_splits), list(recv_splits), group)


@dataclass
class _RouteContext:
    order: torch.Tensor          # [T*K] position in the flattened (token, k) list of each sorted row
    send_splits: list[int]       # rows sent to each EP rank
    recv_splits: list[int]       # rows received from each EP rank
    local_order: torch.Tensor    # received row feeding each expert-sorted row
    topk_weight: torch.Tensor    # [T, K]
    num_tokens: int


class AllToAllDispatcher:
    """Token exchange for experts split over `group` (size EP); `num_experts` is the global E."""

    def __init__(self, num_experts: int, group: dist.ProcessGroup) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep_size:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel "
                             f"group size {self.ep_size}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size

    @property
    def local_expert_offset(self) -> int:
        return self.ep_rank * self.num_local_experts

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor):
        """x [T, H], topk_idx/topk_weight [T, K] -> rows for this rank's experts sorted by local
        expert, their counts [E/EP], and the route back."""
        num_tokens, top_k = topk_idx.shape
        flat_expert = topk_idx.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)  # grouped by expert, hence by EP rank
        send_x = x.index_select(0, order // top_k)

        counts = torch.bincount(flat_expert, minlength=self.num_experts)
        recv_counts = torch.empty_like(counts)
        # counts first: everyone learns how many rows each peer sends to each local expert
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send_splits = counts.view(self.ep_size, -1).sum(1).tolist()
        recv_per_source = recv_counts.view(self.ep_size, self.num_local_experts)
        recv_splits = recv_per_source.sum(1).tolist()

        recv_x = all_to_all(send_x, send_splits, recv_splits, self.group)

        # received rows come grouped by (source rank, local expert): regroup by local expert
        chunk = torch.repeat_interleave(
            torch.arange(recv_per_source.numel(), device=recv_x.device), recv_per_source.reshape(-1)
        )
        source, local_expert = chunk // self.num_local_experts, chunk % self.num_local_experts
        local_order = torch.argsort(local_expert * self.ep_size + source, stable=True)
        sorted_x = recv_x.index_select(0, local_order)
        local_counts = recv_per_source.sum(0)
        ctx = _RouteContext(order=order, send_splits=send_splits, recv_splits=recv_splits,
                            local_order=local_order, topk_weight=topk_weight, num_tokens=num_tokens)
        return sorted_x, local_counts, ctx

    def combine(self, expert_out: torch.Tensor, ctx: _RouteContext) -> torch.Tensor:
        """Expert outputs (in `dispatch`'s sorted order) -> y [T, H], weighted by topk_weight."""
        back = torch.empty_like(ctx.local_order)
        back[ctx.local_order] = torch.arange(ctx.local_order.numel(), device=back.device)
        recv_out = expert_out.index_select(0, back)
        send_out = all_to_all(recv_out, ctx.recv_splits, ctx.send_splits, self.group)
        unsort = torch.empty_like(ctx.order)
        unsort[ctx.order] = torch.arange(ctx.order.numel(), device=unsort.device)
        per_choice = send_out.index_select(0, unsort).view(ctx.num_tokens, -1, send_out.shape[-1])
        weight = ctx.topk_weight.to(per_choice.dtype).unsqueeze(-1)
        return (per_choice * weight).sum(1)
