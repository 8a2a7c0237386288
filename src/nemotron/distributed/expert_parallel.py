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

from nemotron.kernels.moe_combine import weighted_combine
from nemotron.models.nano3.moe import (
    count_per_expert,
    gather_token_rows,
    inverse_permutation,
    narrow_expert_ids,
)


class _AllToAll(torch.autograd.Function):
    """Differentiable all_to_all_single with uneven splits (the backward is the reverse route)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup
    ) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def _all_to_all(
    x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group)
    return out


def all_to_all(
    x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Send rows `x[sum(send_splits[:j]) : ...]` to rank j of `group`, differentiably."""
    return _AllToAll.apply(x, list(send_splits), list(recv_splits), group)


class PendingExchange:
    """The in-flight forward all-to-all of `all_to_all_start`: `wait()` before reading the
    received rows (on CUDA it orders the current stream after NCCL's; it does not block the
    host)."""

    def __init__(self) -> None:
        self.work: dist.Work | None = None

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


class _AllToAllStart(torch.autograd.Function):
    """`_AllToAll` whose forward returns as soon as the exchange is launched (the caller works
    on something else, then waits on `pending`); the backward is the synchronous reverse route."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        send_splits: list[int],
        recv_splits: list[int],
        group: dist.ProcessGroup,
        pending: PendingExchange,
    ) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        x = x.contiguous()
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        pending.work = dist.all_to_all_single(
            out, x, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group, async_op=True
        )
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (_all_to_all(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None, None)


def all_to_all_start(
    x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup
) -> tuple[torch.Tensor, PendingExchange]:
    """`all_to_all`, launched asynchronously: returns (received rows, pending); call
    `pending.wait()` before the rows are read."""
    pending = PendingExchange()
    out = _AllToAllStart.apply(x, list(send_splits), list(recv_splits), group, pending)
    return out, pending


class _PermuteRows(torch.autograd.Function):
    """rows[j] = x[perm[j]] for a permutation `perm` with inverse `inverse`: the backward is the
    inverse gather (index_select's own backward would be an atomic index_add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


@dataclass
class _RouteContext:
    order: torch.Tensor  # [T*K] (token, k) pair of each expert-sorted row sent
    position: torch.Tensor  # inverse of `order`
    send_splits: list[int]  # rows sent to each EP rank
    recv_splits: list[int]  # rows received from each EP rank
    local_order: torch.Tensor  # received row feeding each expert-sorted row
    local_position: torch.Tensor  # inverse of `local_order`
    topk_weight: torch.Tensor  # [T, K]


class AllToAllDispatcher:
    """Token exchange for experts split over `group` (size EP); `num_experts` is the global E.

    The rows sent are sorted by global expert exactly as `LocalDispatcher` sorts them, so the
    dispatch gather and the weighted combine are the local path's (deterministic backward,
    Triton combine on CUDA). The split sizes of the all-to-all must be known on the host: one
    device-to-host copy per dispatch (both lists at once).

    What overlaps the exchanges: the per-expert counts travel while the rows to send are
    sorted and gathered; the rows travel while the receiving side's regrouping permutation is
    computed; and the MoE layer may run its shared expert on a side CUDA stream
    (`shared_expert_side_stream`) across the whole dispatch, the host sync included, and its
    backward beside the backward exchanges. With `early_splits` (CUDA) the split sizes reach
    the host from a copy stream that waits for the counts alone, so the host blocks only until
    the counts have arrived while the GPU is still sorting and gathering the rows (without it
    the copy waits behind that work and the GPU idles until the host launches the next
    kernels)."""

    # MoE may run the shared expert on a side stream beside dispatch/combine (models/nano3/moe.py)
    shared_expert_side_stream = True

    def __init__(self, num_experts: int, group: dist.ProcessGroup, *, early_splits: bool = True) -> None:
        self.group = group
        self.early_splits = early_splits
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel group size {self.ep_size}"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size

    @property
    def local_expert_offset(self) -> int:
        return self.ep_rank * self.num_local_experts

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor):
        """x [T, H], topk_idx/topk_weight [T, K] -> rows for this rank's experts sorted by local
        expert, their counts [E/EP], and the route back."""
        top_k = topk_idx.shape[1]
        flat_expert = topk_idx.reshape(-1)
        counts = count_per_expert(flat_expert, self.num_experts)
        recv_counts = torch.empty_like(counts)
        # counts first (everyone learns how many rows each peer sends to each local expert),
        # while the rows to send are sorted by expert (hence by EP rank) and gathered
        counts_sent = dist.all_to_all_single(recv_counts, counts, group=self.group, async_op=True)
        early = self._start_split_copy(counts, recv_counts, counts_sent)
        order = torch.argsort(narrow_expert_ids(flat_expert, self.num_experts), stable=True)
        position = inverse_permutation(order)
        send_x = gather_token_rows(x, order, position, top_k)
        counts_sent.wait()
        recv_per_source = recv_counts.view(self.ep_size, self.num_local_experts)
        if early is not None:
            host, copied = early
            copied.synchronize()  # the counts' path only: the gather may still be running
            splits = host.tolist()
        else:
            splits = self._split_sizes(counts, recv_counts).tolist()
        send_splits, recv_splits = splits[: self.ep_size], splits[self.ep_size :]

        recv_x, rows_sent = all_to_all_start(send_x, send_splits, recv_splits, self.group)
        # while the rows travel: received rows come grouped by (source rank, local expert), so
        # the permutation regrouping them by local expert depends on the counts alone
        chunk = torch.repeat_interleave(
            torch.arange(recv_per_source.numel(), device=recv_counts.device),
            recv_per_source.reshape(-1),
            output_size=sum(recv_splits),
        )
        source, local_expert = chunk // self.num_local_experts, chunk % self.num_local_experts
        key = narrow_expert_ids(local_expert * self.ep_size + source, self.num_experts)
        local_order = torch.argsort(key, stable=True)
        local_position = inverse_permutation(local_order)
        rows_sent.wait()
        sorted_x = _PermuteRows.apply(recv_x, local_order, local_position)
        ctx = _RouteContext(
            order=order,
            position=position,
            send_splits=send_splits,
            recv_splits=recv_splits,
            local_order=local_order,
            local_position=local_position,
            topk_weight=topk_weight,
        )
        return sorted_x, recv_per_source.sum(0), ctx

    def _split_sizes(self, counts: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
        """[rows sent to each EP rank..., rows received from each...]: one tensor, one copy."""
        return torch.cat([counts.view(self.ep_size, -1).sum(1), recv_counts.view(self.ep_size, -1).sum(1)])

    def _start_split_copy(self, counts: torch.Tensor, recv_counts: torch.Tensor, counts_sent):
        """On CUDA with `early_splits`: copy the split sizes to pinned host memory on a copy
        stream ordered after the counts' exchange only; returns (host tensor, event) or None."""
        if not (self.early_splits and counts.is_cuda):
            return None
        stream = _copy_stream(counts.device)
        stream.wait_stream(torch.cuda.current_stream(counts.device))  # counts are computed
        with torch.cuda.stream(stream):
            counts_sent.wait()  # NCCL: this stream waits for the exchange; the host does not
            sizes = self._split_sizes(counts, recv_counts)
            host = torch.empty(sizes.shape, dtype=sizes.dtype, pin_memory=True)
            host.copy_(sizes, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        # `counts`/`recv_counts` (made on the current stream) stay referenced until the caller
        # has synchronised `copied`, so the copy stream is done with them before they are freed
        return host, copied

    def combine(
        self, expert_out: torch.Tensor, ctx: _RouteContext, add: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Expert outputs (in `dispatch`'s sorted order) -> y [T, H], weighted by topk_weight,
        plus `add` [T, H] (the shared expert's output) in the same pass when given."""
        recv_out = _PermuteRows.apply(expert_out, ctx.local_position, ctx.local_order)
        send_out = all_to_all(recv_out, ctx.recv_splits, ctx.send_splits, self.group)
        return weighted_combine(send_out, ctx.order, ctx.position, ctx.topk_weight, add)


_COPY_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    """One stream per device for the split-size copies (not the MoE side stream, which may be
    busy with the shared expert)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = torch.device("cuda", index)
    if key not in _COPY_STREAMS:
        _COPY_STREAMS[key] = torch.cuda.Stream(device=key)
    return _COPY_STREAMS[key]
