"""NCCL bus bandwidth per collective and message size on the GPUs of one host: the numbers the
performance model (`nemotron.train.perf_model.H200`) assumes until they are measured.

    torchrun --nproc-per-node 4 benchmarks/nccl_bandwidth.py --out nccl4.json

Collectives as training issues them: `all_gather_into_tensor` (FSDP2's bf16 weights),
`reduce_scatter_tensor` (fp32 gradients), `all_to_all_single` with even splits and with the
uneven splits of MoE routing (bf16 rows of the hidden size). For each full-tensor size: the
median time of back-to-back calls and the bus bandwidth, nccl-tests' definition:
size * (n-1)/n / time for the all-gather, reduce-scatter and all-to-all (the share of the
tensor that crosses links). Rank 0 writes JSON and prints one line per measurement.
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

SIZES_MB = (4, 16, 64, 256, 1024)


def _time(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    t = torch.tensor([statistics.median(times)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _uneven_splits(rows: int, n: int, rank: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Send splits skewed like top-k routing (some peers get 2-3x others), and the matching
    receive splits (exchanged)."""
    weights = torch.rand(n, generator=generator) + 0.3
    send = (weights / weights.sum() * rows).floor().long()
    send[-1] += rows - int(send.sum())
    recv_cuda = torch.empty(n, dtype=torch.long, device="cuda")
    dist.all_to_all_single(recv_cuda, send.cuda())
    return send.tolist(), recv_cuda.tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=list(SIZES_MB))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=2688)
    args = parser.parse_args(argv)
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    rank, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    rows_out = []
    for mb in args.sizes_mb:
        size = mb * 2**20
        for name, dtype in (
            ("all_gather_into_tensor", torch.bfloat16),
            ("reduce_scatter_tensor", torch.float32),
            ("all_to_all_single", torch.bfloat16),
            ("all_to_all_single_uneven", torch.bfloat16),
        ):
            elems = size // torch.tensor([], dtype=dtype).element_size()
            if name == "all_gather_into_tensor":
                full = torch.empty(elems // n * n, dtype=dtype, device="cuda")
                shard = torch.randn(elems // n, device="cuda").to(dtype)
                fn = lambda full=full, shard=shard: dist.all_gather_into_tensor(full, shard)
            elif name == "reduce_scatter_tensor":
                full = torch.randn(elems // n * n, device="cuda", dtype=dtype)
                shard = torch.empty(elems // n, dtype=dtype, device="cuda")
                fn = lambda full=full, shard=shard: dist.reduce_scatter_tensor(shard, full)
            else:
                rows = elems // args.hidden  # this rank's rows (the tensor size per rank)
                x = torch.randn(rows, args.hidden, device="cuda").to(dtype)
                if name.endswith("uneven"):
                    send, recv = _uneven_splits(rows, n, rank, g)
                else:
                    send = recv = [rows // n] * (n - 1) + [rows - rows // n * (n - 1)]
                out = torch.empty(sum(recv), args.hidden, dtype=dtype, device="cuda")
                fn = lambda out=out, x=x, send=send, recv=recv: dist.all_to_all_single(
                    out, x, output_split_sizes=recv, input_split_sizes=send
                )
            seconds = _time(fn, args.iters, args.warmup)
            busbw = size * (n - 1) / n / seconds
            row = {
                "collective": name,
                "world": n,
                "size_mb": mb,
                "dtype": str(dtype),
                "seconds": seconds,
                "busbw_GBps": round(busbw / 1e9, 1),
            }
            rows_out.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "gpu": torch.cuda.get_device_name(),
                    "world": n,
                    "torch": torch.__version__,
                    "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                    "rows": rows_out,
                },
                indent=2,
            )
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
