"""Per-GPU memory of the full Nemotron 3 Nano under a parallel layout, computed by running the
real sharding code (`nemotron.distributed.parallelize`) on a meta-device model inside a fake
process group of the target world size: every parameter's local shard shape is exactly what
rank 0 would hold on the cluster.

    .venv/bin/python benchmarks/memory_estimate.py --world-size 64 --tp 8 --ep 8

Counted per GPU (bytes per locally held parameter element):
  master weights fp32 (4) + gradients fp32 (4) + AdamW exp_avg/exp_avg_sq fp32 (8) = 16;
  FSDP2 transient: the unsharded bf16 parameters and bf16 gradients of the largest FSDP unit,
  twice (the unit computing and the one prefetched);
  LM-head loss buffers: fp32 vocab-shard logits and softmax of one piece of the vocab-parallel
  loss (at most `tensor_parallel.LOSS_CHUNK_TOKENS` tokens of this rank's 1/CP of the
  micro-batch's sequences);
  with context parallelism, the all-gathered bf16 K and V of the whole sequence that one
  attention layer holds (each TP rank the KV heads its query heads read).
Not counted: other activations (depend on micro-batch, recompute and kernels: measure them on
a GPU), CUDA context and allocator fragmentation.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from nemotron.distributed import ParallelDims, ParallelismConfig, build_mesh, parallelize
from nemotron.models.nano3 import Nano3Config, Nano3ForCausalLM

GIB = 1024**3


def _local_numel(t: torch.Tensor) -> int:
    return (t.to_local() if isinstance(t, DTensor) else t).numel()


def estimate(world_size: int, tp: int, ep: int, seq_length: int, micro_batch: int,
             cp: int = 1) -> dict:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        config = Nano3Config()
        parallel = ParallelismConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                     context_parallel_size=cp, sequence_parallel=tp > 1)
        dims = ParallelDims.from_config(parallel, world_size, config)
        with torch.device("meta"):
            model = Nano3ForCausalLM(config)
        total_params = sum(p.numel() for p in model.parameters())
        unit_full = {}  # FSDP unit -> parameters it all-gathers on this rank (TP/EP-local)
        for i, block in enumerate(model.backbone.layers.values()):
            experts = [m for n, m in block.named_modules() if n.endswith("experts") and
                       not n.endswith("shared_experts")]
            unit_full[f"layers.{i}"] = block
            if experts:
                unit_full[f"layers.{i}.experts"] = experts[0]
        mesh = build_mesh(dims, "cpu")
        parallelize(model, mesh, parallel, mixed_precision=True)
        local = sum(_local_numel(p) for p in model.parameters())

        def unsharded_numel(module) -> int:
            # what FSDP all-gathers for this unit: the TP/EP-local part of each parameter
            # (mesh dim 0 of a sharded parameter is FSDP's; the others are TP or EP)
            n = 0
            for p in module.parameters(recurse=True):
                split = 1
                for i in range(1, p.device_mesh.ndim):
                    if p.placements[i].is_shard():
                        split *= p.device_mesh.size(i)
                n += p.numel() // split
            return n

        blocks = {name: unsharded_numel(m) for name, m in unit_full.items()
                  if not name.endswith("experts")}
        experts = {name: unsharded_numel(m) for name, m in unit_full.items()
                   if name.endswith("experts")}
        # a MoE block's own unit excludes its experts (they are their own unit)
        for name in experts:
            blocks[name.rsplit(".", 1)[0]] -= experts[name]
        largest_unit = max(list(blocks.values()) + list(experts.values()))
    finally:
        dist.destroy_process_group()

    states = 16 * local
    transient = 2 * largest_unit * (2 + 2)
    tokens = micro_batch * seq_length // cp  # this rank's part of each sequence
    from nemotron.distributed.tensor_parallel import LOSS_CHUNK_TOKENS

    loss_buffers = 2 * 4 * min(tokens, LOSS_CHUNK_TOKENS) * config.vocab_size // tp
    kv_heads = max(1, config.num_key_value_heads // tp)
    kv_gather = (2 * 2 * micro_batch * seq_length * kv_heads * config.head_dim) if cp > 1 else 0
    return {
        "layout": dims.describe(),
        "total_params": total_params,
        "local_params": local,
        "model_states_gib": states / GIB,
        "fsdp_transient_gib": transient / GIB,
        "largest_fsdp_unit_params": largest_unit,
        "loss_buffers_gib": loss_buffers / GIB,
        "cp_kv_gather_gib": kv_gather / GIB,
        "total_counted_gib": (states + transient + loss_buffers + kv_gather) / GIB,
        "micro_batch": micro_batch,
        "seq_length": seq_length,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, nargs="+", default=[8, 16, 64, 256])
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [estimate(w, args.tp, args.ep, args.seq_length, args.micro_batch, args.cp)
            for w in args.world_size]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"Nemotron 3 Nano, {rows[0]['total_params'] / 1e9:.2f}B parameters; TP{args.tp} "
          f"EP{args.ep} CP{args.cp}, micro-batch {args.micro_batch} x {args.seq_length} tokens")
    print("| GPUs | layout | params/GPU | weights+grads+AdamW | FSDP transient | loss buffers "
          "| CP K/V gather | total counted |")
    print("|---|---|---|---|---|---|---|---|")
    for w, r in zip(args.world_size, rows):
        print(f"| {w} | {r['layout']} | {r['local_params'] / 1e9:.3f}B | "
              f"{r['model_states_gib']:.1f} GiB | {r['fsdp_transient_gib']:.1f} GiB | "
              f"{r['loss_buffers_gib']:.1f} GiB | {r['cp_kv_gather_gib']:.2f} GiB | "
              f"{r['total_counted_gib']:.1f} GiB |")


if __name__ == "__main__":
    main()
