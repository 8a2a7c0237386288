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

import time

PROCESS_START = time.time()  # before the heavy imports: time to first step counts them

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from nemotron.config.loader import load_config  # noqa: E402
from nemotron.config.schema import PretrainConfig  # noqa: E402
from nemotron.distributed.utils import launcher_process_group  # noqa: E402
from nemotron.train import pretrain  # noqa: E402
from nemotron.train.metrics import read_metrics  # noqa: E402


def _peak_memory(world: int) -> list[dict[str, float]]:
    if not torch.cuda.is_available():
        return []
    mine = torch.tensor(
        [torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30], device="cuda"
    )
    if world == 1:
        rows = [mine]
    else:
        rows = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(rows, mine)
    return [{"allocated_gib": round(r[0].item(), 2), "reserved_gib": round(r[1].item(), 2)} for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="default")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument(
        "--fake-world",
        type=int,
        default=0,
        metavar="W",
        help="one GPU as rank 0 of W ranks (torch's fake process group: "
        "collectives do nothing, so losses and speed are meaningless, but "
        "every buffer is allocated as on the cluster): real peak memory "
        "of a layout on one GPU. Not with expert parallelism (the "
        "all-to-all needs the peers' counts)",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides, PretrainConfig)
    cfg.checkpoint.save = None
    cfg.checkpoint.load = None
    cfg.train.eval_iters = 0
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if args.fake_world:
        if cfg.model.expert_model_parallel_size > 1:
            parser.error("--fake-world cannot run expert parallelism (see --help)")
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.fake_world)
        _run_fake(args, cfg)
        return 0
    # Joined here, not inside pretrain, so that the peak memory of every rank can be gathered after.
    with launcher_process_group(device_type):
        _run(args, cfg)
    return 0


def _prediction(cfg: PretrainConfig, world: int) -> dict:
    """What `nemotron.train.perf_model` (`nemotron nano3 plan`) predicts for this run."""
    from nemotron.train import perf_model as pm

    try:
        plan = pm.estimate(cfg.model.arch(), pm.layout_from_config(cfg, world), pm.shape_from_config(cfg))
    except pm.PlanError as exc:
        return {"error": str(exc)}
    return {
        "peak_allocated_gib": round(plan.memory.total, 2),
        "tokens_per_second_per_gpu": round(plan.tokens_per_second_per_gpu),
        "step_time_s": round(plan.step.total, 3),
        "fits": plan.memory.fits,
    }


def _allocated_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def _run_fake(args: argparse.Namespace, cfg: PretrainConfig) -> None:
    """Rank 0 of a fake `--fake-world` group on one GPU: the training library's model build,
    sharding, initialisation and `train_step`. The gathered weights are whatever memory the
    no-op all-gather left, so the loss may be non-finite and `train_step` would skip AdamW:
    one step on zero gradients first creates the optimizer state, as a real first step does."""
    from nemotron.train.loop import build_model, train_step
    from nemotron.train.optimizer import build_optimizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = cfg.train
    model, parallel = build_model(cfg, device)
    optimizer = build_optimizer(model, cfg.optimizer)
    built = time.time() - PROCESS_START
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    accum = t.global_batch_size // (t.micro_batch_size * parallel.dp_size)
    shape = (t.micro_batch_size, t.seq_length)
    step_times, first = [], None
    for _ in range(max(cfg.train.train_iters or 2, 2)):
        batches = [
            {
                "tokens": torch.randint(0, cfg.model.vocab_size, shape),
                "labels": torch.randint(0, cfg.model.vocab_size, shape),
                "loss_mask": torch.ones(shape),
            }
            for _ in range(accum)
        ]
        start = time.time()
        train_step(
            model,
            optimizer,
            batches,
            device=device,
            precision=t.precision,
            grad_clip=t.grad_clip,
            parallel=parallel,
            fsdp_accumulate_unsharded=t.fsdp_accumulate_unsharded,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.time() - start)
        first = first or time.time() - PROCESS_START
        print(
            f"[{time.time() - PROCESS_START:8.2f} s] step, peak allocated {_allocated_gib():.1f} GiB",
            flush=True,
        )
    result = {
        "name": args.name,
        "fake_world": args.fake_world,
        "overrides": args.overrides,
        "grad_accumulation": accum,
        "start_s": round(built, 2),
        "first_step_s": round(first, 2),
        "step_time_s": statistics.median(step_times[1:] or step_times),
        "peak_memory_per_gpu": _peak_memory(1),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "note": "fake process group: memory is real, losses and speed are not",
        "predicted": _prediction(cfg, args.fake_world),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    dist.destroy_process_group()


class _Phases:
    """Seconds from process start to the run's start (model built, sharded, initialised,
    optimizer and data ready) and to each logged step, printed as they happen, so a run cut
    off by a time limit still shows how far it got."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def __call__(self, kind: str, payload: dict) -> None:
        now = round(time.time() - PROCESS_START, 2)
        if kind == "start":
            self.times["start_s"] = now
        elif kind == "train":
            self.times.setdefault("first_step_s", now)
            self.times["last_step_s"] = now
        else:
            return
        memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        print(f"[{now:8.2f} s] {kind} step={payload.get('step')} peak allocated {memory:.1f} GiB", flush=True)


def _run(args: argparse.Namespace, cfg: PretrainConfig) -> None:
    world = dist.get_world_size() if dist.is_initialized() else 1
    job_dir = args.out / f"{args.name}-job"
    phases = _Phases()
    print(f"[{time.time() - PROCESS_START:8.2f} s] process group joined, world {world}", flush=True)
    summary = pretrain(cfg, job_dir, on_event=phases)
    memory = _peak_memory(world)
    if world == 1 or dist.get_rank() == 0:
        steps = [r for r in read_metrics(job_dir) if r["kind"] == "train"]
        timed = steps[args.warmup :] or steps
        tps = statistics.median(r["tokens_per_second"] for r in timed)
        result = {
            "name": args.name,
            "world_size": world,
            "overrides": args.overrides,
            "losses": [r["loss"] for r in steps],
            "tokens_per_second": tps,
            "tokens_per_second_per_gpu": tps / world,
            "step_time_s": statistics.median(r["step_time"] for r in timed),
            "tflops_per_gpu": statistics.median(r["tflops"] for r in timed),
            "mfu": statistics.median(r["mfu"] for r in timed),
            "peak_memory_per_gpu": memory,
            "final_loss": summary.final_loss,
            **phases.times,
            "predicted": _prediction(cfg, world),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
        print(
            json.dumps(
                {
                    k: result.get(k)
                    for k in (
                        "name",
                        "losses",
                        "tokens_per_second_per_gpu",
                        "mfu",
                        "peak_memory_per_gpu",
                        "start_s",
                        "first_step_s",
                    )
                }
            )
        )


if __name__ == "__main__":
    sys.exit(main())
