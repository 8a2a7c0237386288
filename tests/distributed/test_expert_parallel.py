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


def _moe_layer_worker(rank, world_size):
    """A whole MoE layer (router, routed experts, shared expert) with its experts split over
    the ranks and the all-to-all dispatcher gives, on every rank's own tokens, the output and
    the input gradient of the same layer with every expert local, bit for bit; the router and
    shared-expert gradients are the local ones of this rank's tokens, and each rank's expert
    gradients are its slice of the local gradients summed over the ranks' tokens."""
    import torch.nn as nn
    from models.tiny import tiny_config  # tests/ is on the path (as in harness.py)

    from nemotron.models.nano3.moe import MoE

    cfg = tiny_config(num_experts=8, moe_top_k=3)
    torch.manual_seed(0)  # the same weights on every rank
    local = MoE(cfg)
    ep = MoE(cfg)
    ep.load_state_dict(local.state_dict())
    per_rank = cfg.num_experts // world_size
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    for name in ("up_proj", "down_proj"):
        setattr(ep.experts, name, nn.Parameter(getattr(local.experts, name).detach()[lo:hi].clone()))
    ep.dispatcher = AllToAllDispatcher(cfg.num_experts, dist.group.WORLD)
    assert ep.dispatcher.shared_expert_side_stream  # the layer may overlap its shared expert

    g = torch.Generator().manual_seed(50 + rank)
    x = torch.randn(1, 5 + 3 * rank, cfg.hidden_size, generator=g)  # uneven token counts

    def run(layer):
        leaf = x.clone().requires_grad_()
        y, aux = layer(leaf)
        (y.square().sum() + aux).backward()
        return y.detach(), leaf.grad, {n: p.grad for n, p in layer.named_parameters()}

    y_local, dx_local, grads_local = run(local)
    y_ep, dx_ep, grads_ep = run(ep)
    # An expert's GEMM sees this rank's rows (local) or every rank's rows (EP): a CPU matmul may
    # block a different row count differently, so equal to float32 rounding, not bit for bit.
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_ep, y_local, **close, msg="y")
    torch.testing.assert_close(dx_ep, dx_local, **close, msg="dx")
    for name, grad in grads_ep.items():
        want = grads_local[name]
        if name.startswith("experts."):
            want = want.clone()
            dist.all_reduce(want)  # every rank's tokens reach these experts
            want = want[lo:hi]
        torch.testing.assert_close(grad, want, **close, msg=name)
    return sorted(grads_ep)


def test_moe_layer_with_expert_parallel_four_ranks():
    names = run_distributed(_moe_layer_worker, 4)[0]
    assert "experts.up_proj" in names and "router.weight" in names
    assert "shared_experts.up_proj.weight" in names
