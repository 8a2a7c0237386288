"""The all-to-all dispatcher returns every token to its place and matches local dispatch."""

import torch
import torch.distributed as dist

from nemotron.distributed.expert_parallel import AllToAllDispatcher
from nemotron.models.nano3.moe import LocalDispatcher

from ._spawn import run_distributed

NUM_EXPERTS, TOP_K, HIDDEN = 8, 3, 4


def expert_fn(rows: torch.Tensor, counts: torch.Tensor, first_expert: int) -> torch.Tensor:
    """Expert e maps x to x * (e + 1) + e: every expert leaves a distinct fingerprint."""
    expert_id = torch.repeat_interleave(torch.arange(counts.numel()), counts) + first_expert
    return rows * (expert_id[:, None] + 1) + expert_id[:, None]


def rank_inputs(rank: int, skew: bool):
    g = torch.Generator().manual_seed(100 + rank)
    tokens = 3 + 4 * rank  # uneven token counts per rank
    x = torch.randn(tokens, HIDDEN, generator=g)
    if skew and rank == 0:  # every slot to the last experts: some peers receive nothing from us
        idx = torch.tensor([[NUM_EXPERTS - 1, NUM_EXPERTS - 2, NUM_EXPERTS - 3]]).expand(tokens, -1)
    else:
        idx = torch.stack([torch.randperm(NUM_EXPERTS, generator=g)[:TOP_K] for _ in range(tokens)])
    w = torch.rand(tokens, TOP_K, generator=g)
    return x, idx.contiguous(), w


def _worker(rank, world_size, skew):
    """Same outputs and gradients (input, combine weights, the added shared-expert output) as
    the local dispatcher, bit for bit: the EP path sorts, gathers and combines with the same
    functions, only the rows travel."""
    x, idx, w = rank_inputs(rank, skew)
    shared = torch.randn(x.shape, generator=torch.Generator().manual_seed(7 + rank))

    def run(dispatcher, first_expert):
        leaves = [t.clone().requires_grad_() for t in (x, w, shared)]
        rows, counts, ctx = dispatcher.dispatch(leaves[0], idx, leaves[1])
        y = dispatcher.combine(expert_fn(rows, counts, first_expert(dispatcher)), ctx, add=leaves[2])
        y.square().sum().backward()
        return counts, [y] + [t.grad for t in leaves]

    _, want = run(LocalDispatcher(NUM_EXPERTS), lambda d: 0)
    ep = AllToAllDispatcher(NUM_EXPERTS, dist.group.WORLD)
    counts, got = run(ep, lambda d: d.local_expert_offset)
    assert counts.numel() == NUM_EXPERTS // world_size
    # every row that arrived belongs to one of this rank's experts
    total = torch.tensor([counts.sum().item(), idx.numel()])
    dist.all_reduce(total)
    assert total[0] == total[1], "tokens were dropped or duplicated"
    for name, a, b in zip(["y", "dx", "dweight", "dshared"], got, want):
        assert torch.equal(a, b), name
    return int(counts.sum())


def test_all_to_all_two_ranks():
    received = run_distributed(_worker, 2, False)
    assert sum(received) == (3 + 7) * TOP_K


def test_all_to_all_four_ranks_skewed():
    received = run_distributed(_worker, 4, True)
    assert sum(received) == (3 + 7 + 11 + 15) * TOP_K
    assert received[-1] > received[0]  # rank 0 sent all its slots to the last rank's experts
