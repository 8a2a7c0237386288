"""Expert parallelism on N GPUs, one full-width Nano3 MoE layer (128 experts, top-6, shared
expert), forward + backward per GPU: every expert local (the per-GPU reference: no exchange)
vs EP=N with nothing beside the exchanges ("sync": shared expert on the same stream, split
sizes copied behind the row gather), with the shared expert on the side stream ("side"), and
with that plus the early split-size copy ("overlap", the training default since issue 21).
Also checks that the EP modes give bit-identical outputs and gradients, and how close EP is
to local.

    torchrun --nproc-per-node 4 benchmarks/ep_overlap.py --out ep4.json [--micro-batch 2]

Rank 0 writes JSON: ms per forward+backward (median of timed calls, back to back) per mode,
the EP cost over local per mode, and the checks. Run by benchmarks/multi_gpu_proxy.sh
(`ONLY=ep_overlap`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def _layer(cfg, mode: str, rank: int, world: int, reference: nn.Module) -> nn.Module:
    from nemotron.distributed.expert_parallel import AllToAllDispatcher
    from nemotron.models.nano3.moe import MoE

    with torch.device("cuda"):  # initialised on the GPU (fast), then given the reference weights
        layer = MoE(cfg)
    layer.load_state_dict(reference.state_dict())
    if mode != "local":
        per = cfg.num_experts // world
        for name in ("up_proj", "down_proj"):
            full = getattr(reference.experts, name).detach()
            setattr(layer.experts, name, nn.Parameter(full[rank * per : (rank + 1) * per].clone()))
        layer.dispatcher = AllToAllDispatcher(
            cfg.num_experts, dist.group.WORLD, early_splits=mode == "overlap"
        )
    layer.shared_expert_overlap = mode != "sync"
    return layer.to(torch.bfloat16)


def _time(layer, x, iters: int, warmup: int) -> list[float]:
    times = []
    for i in range(warmup + iters):
        leaf = x.detach().requires_grad_()
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y, aux = layer(leaf)
        (y.float().square().mean() + aux).backward()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
        layer.zero_grad(set_to_none=True)
    return times


def _outputs(layer, x):
    leaf = x.detach().requires_grad_()
    y, aux = layer(leaf)
    (y.float().square().mean() + aux).backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    return y.detach(), leaf.grad.detach(), grads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)

    from nemotron.models.nano3 import Nano3Config
    from nemotron.models.nano3.moe import MoE

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = Nano3Config()
    torch.manual_seed(0)
    with torch.device("cuda"):
        reference = MoE(cfg)  # the same weights on every rank (same seed, same GPU model)
    for p in reference.parameters():  # make sure of it: rank 0's weights everywhere
        dist.broadcast(p.data, 0)
    g = torch.Generator(device="cuda").manual_seed(1000 + rank)  # each rank its own tokens
    x = torch.randn(
        args.micro_batch, args.seq, cfg.hidden_size, device="cuda", generator=g, dtype=torch.bfloat16
    )
    result = {
        "world": world,
        "micro_batch": args.micro_batch,
        "seq": args.seq,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "ms": {},
    }
    outs = {}
    for mode in ("local", "sync", "side", "overlap"):
        layer = _layer(cfg, mode, rank, world, reference)
        outs[mode] = _outputs(layer, x)
        times = _time(layer, x, args.iters, args.warmup)
        t = torch.tensor([statistics.median(times)], device="cuda")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        result["ms"][mode] = round(t.item(), 3)
        del layer
        torch.cuda.empty_cache()
    y_s, dx_s, g_s = outs["sync"]
    same = all(
        torch.equal(y_s, outs[m][0])
        and torch.equal(dx_s, outs[m][1])
        and all(torch.equal(g_s[n], outs[m][2][n]) for n in g_s)
        for m in ("side", "overlap")
    )
    flags = torch.tensor([float(same)], device="cuda")
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    y_l, dx_l, _ = outs["local"]
    rel = torch.tensor(
        [
            ((y_s.float() - y_l.float()).norm() / y_l.float().norm()).item(),
            ((dx_s.float() - dx_l.float()).norm() / dx_l.float().norm()).item(),
        ],
        device="cuda",
    )
    dist.all_reduce(rel, op=dist.ReduceOp.MAX)
    result["ep_modes_bit_equal"] = bool(flags.item())
    result["ep_vs_local_rel_err_y_dx"] = [round(v, 6) for v in rel.tolist()]
    local = result["ms"]["local"]
    result["ep_cost_over_local"] = {
        m: round(result["ms"][m] / local - 1, 4) for m in ("sync", "side", "overlap")
    }
    if rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
    dist.destroy_process_group()
    return 0 if result["ep_modes_bit_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
