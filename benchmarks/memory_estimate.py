"""Per-GPU memory of the full Nemotron 3 Nano under a parallel layout: the performance model's
breakdown (`nemotron.train.perf_model`, also shown by `nemotron nano3 plan`), checked against
the real sharding code: `nemotron.distributed.parallelize` (distributed/apply.py) runs on a meta-device model inside a
fake process group of the target world size, and rank 0's shard of every FSDP unit must hold
exactly the elements the model counts. Also reports how long building and sharding the model
on the meta device takes (the first part of a run's time to first step).

    .venv/bin/python benchmarks/memory_estimate.py --world-size 4 8 64 --tp 1 --ep 8 [--recompute]

Model memory (bytes per parameter, activations per block kind, FSDP buffers): see
`perf_model.estimate_memory`. What a fake process group cannot show (activations, allocator
fragmentation) is measured on one GPU by benchmarks/fake_world_memory.sh.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from nemotron.distributed import ParallelDims, ParallelismConfig, build_mesh, parallelize
from nemotron.models.nano3 import Nano3Config, Nano3ForCausalLM
from nemotron.train import perf_model as pm


def real_shards(cfg: Nano3Config, layout: pm.Layout) -> tuple[dict[str, int], float]:
    """Rank 0's local elements per FSDP unit after the real `parallelize` (fake process group),
    and the seconds that building on meta + parallelize took."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=layout.world)
    try:
        start = time.perf_counter()
        parallel = ParallelismConfig(
            tensor_model_parallel_size=layout.tp,
            expert_model_parallel_size=layout.ep,
            context_parallel_size=layout.cp,
            sequence_parallel=layout.tp > 1,
        )
        mesh = build_mesh(ParallelDims.from_config(parallel, layout.world, cfg), "cpu")
        with torch.device("meta"):
            model = Nano3ForCausalLM(cfg)
        parallelize(model, mesh, parallel, mixed_precision=True)
        seconds = time.perf_counter() - start
        counts: dict[str, int] = {}
        for name, p in model.named_parameters():
            local = (p.to_local() if isinstance(p, DTensor) else p).numel()
            parts = name.split(".")
            # under TP, parameters FSDP2 sharded over the flattened DP x TP mesh are rank-local
            rank_local = (
                layout.tp > 1
                and isinstance(p, DTensor)
                and any(n.endswith("_tp") for n in p.device_mesh.mesh_dim_names)
            )
            if parts[:2] == ["backbone", "layers"]:
                unit = "layers." + parts[2]
                if ".experts." in name and "shared_experts" not in name:
                    unit += ".experts"
                elif rank_local:
                    unit += ".local"
            elif rank_local:
                unit = "norm_f"
            else:
                unit = "embeddings" if parts[:2] == ["backbone", "embeddings"] else "root"
            counts[unit] = counts.get(unit, 0) + local
        return counts, seconds
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, nargs="+", default=[8, 16, 64, 256])
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--ep", type=int, default=8)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument(
        "--global-batch", type=int, default=None, help="default: one micro-batch per GPU per step"
    )
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--no-check", action="store_true", help="skip the fake-PG sharding check")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cfg = Nano3Config()
    rows = []
    for world in args.world_size:
        layout = pm.Layout(
            world, tp=args.tp, ep=args.ep, cp=args.cp, micro_batch=args.micro_batch, recompute=args.recompute
        )
        shape = pm.RunShape(
            seq_length=args.seq_length, global_batch_size=args.global_batch or layout.dp * args.micro_batch
        )
        plan = pm.estimate(cfg, layout, shape)
        row = {
            "world": world,
            "layout": layout.describe(),
            "accumulation": plan.grad_accumulation,
            **{k: round(v, 2) for k, v in vars(plan.memory).items() if isinstance(v, float)},
            "total_gib": round(plan.memory.total, 2),
            "fits": plan.memory.fits,
            "local_params": sum(u.sharded for u in pm.fsdp_units(cfg, layout)),
        }
        if not args.no_check:
            real, seconds = real_shards(cfg, layout)
            model = {u.name: u.sharded for u in pm.fsdp_units(cfg, layout)}
            row["sharding_matches_parallelize"] = real == model
            row["meta_build_and_parallelize_s"] = round(seconds, 2)
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"Nemotron 3 Nano; micro-batch {args.micro_batch} x {args.seq_length} tokens"
        + (", per-block recompute" if args.recompute else "")
    )
    print(
        "| GPUs | layout | params/GPU | weights+grads+AdamW | FSDP buffers | activations + loss "
        "| total | fits | sharding = parallelize | meta build + parallelize |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['world']} | {r['layout']} x{r['accumulation']} | {r['local_params'] / 1e9:.3f}B | "
            f"{r['weights'] + r['gradients'] + r['optimizer']:.1f} GiB | {r['fsdp_buffers']:.1f} GiB | "
            f"{r['activations'] + r['loss_buffers']:.1f} GiB | {r['total_gib']:.1f} GiB | "
            f"{'yes' if r['fits'] else 'no'} | {r.get('sharding_matches_parallelize', '-')} | "
            f"{r.get('meta_build_and_parallelize_s', '-')} s |"
        )


if __name__ == "__main__":
    main()
