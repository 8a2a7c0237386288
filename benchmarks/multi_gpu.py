"""One multi-GPU (or one-GPU) training run of a Nano3-shaped model through `nemotron.train.pretrain`,
for loss parity and per-GPU throughput across parallel layouts (issue 10).

Run under torchrun for N GPUs (or plain python for one), with recipe overrides:

    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --name dp2ep2 --out OUT \
        model.expert_model_parallel_size=2 ...

The run is the `default` (full Nano3) recipe with the overrides; checkpoints and evaluation are
switched off (a benchmark must not spend minutes writing tens of GB). Rank 0 writes
`OUT/NAME.json`: per-step loss, the median tokens/s per GPU and MFU over the steps after the
first `--warmup` ones, and peak memory per GPU on every rank (CUDA max allocated and reserved).
The FLOP count is the one of `nemotron.train.flops`, as in training logs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nemotron.config.loader import load_config
from nemotron.config.schema import PretrainConfig
from nemotron.distributed.utils import launcher_process_group
from nemotron.train import pretrain
from nemotron.train.metrics import read_metrics


def _peak_memory(world: int) -> list[dict[str, float]]:
    if not torch.cuda.is_available():
        return []
    mine = torch.tensor([torch.cuda.max_memory_allocated() / 2**30,
                         torch.cuda.max_memory_reserved() / 2**30], device="cuda")
    if world == 1:
        rows = [mine]
    else:
        rows = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(rows, mine)
    return [{"allocated_gib": round(r[0].item(), 2), "reserved_gib": round(r[1].item(), 2)}
            for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="default")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides, PretrainConfig)
    cfg.checkpoint.save = None
    cfg.checkpoint.load = None
    cfg.train.eval_iters = 0
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    # Joined here, not inside pretrain, so that the peak memory of every rank can be gathered after.
    with launcher_process_group(device_type):
        _run(args, cfg)
    return 0


def _run(args: argparse.Namespace, cfg: PretrainConfig) -> None:
    world = dist.get_world_size() if dist.is_initialized() else 1
    job_dir = args.out / f"{args.name}-job"
    summary = pretrain(cfg, job_dir)
    memory = _peak_memory(world)
    if world == 1 or dist.get_rank() == 0:
        steps = [r for r in read_metrics(job_dir) if r["kind"] == "train"]
        timed = steps[args.warmup:] or steps
        tps = statistics.median(r["tokens_per_second"] for r in timed)
        result = {
            "name": args.name, "world_size": world, "overrides": args.overrides,
            "losses": [r["loss"] for r in steps],
            "tokens_per_second": tps, "tokens_per_second_per_gpu": tps / world,
            "step_time_s": statistics.median(r["step_time"] for r in timed),
            "tflops_per_gpu": statistics.median(r["tflops"] for r in timed),
            "mfu": statistics.median(r["mfu"] for r in timed),
            "peak_memory_per_gpu": memory, "final_loss": summary.final_loss,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: result[k] for k in ("name", "losses", "tokens_per_second_per_gpu",
                                                  "mfu", "peak_memory_per_gpu")}))


if __name__ == "__main__":
    sys.exit(main())
