"""Long-context training of the Nano3 proxy on one GPU: context parallelism 1, per-block
activation recomputation (`train.activation_recompute`), micro batch 1.

For each sequence length (default 32K, 64K, 128K, 256K, ascending) trains a few steps through
the same path as `benchmarks/train_throughput.py` (`Trainer.step()`: `train_step` + the
expert-bias update) and reports tokens/s, model TFLOP/s, MFU (`train/flops.py`, which counts the causal
attention work growing with the sequence) and peak memory. Stops at the first length that runs
out of memory: the longest length that trained is the single-GPU limit.

    PYTHONPATH=src python3 benchmarks/long_context.py --out long.json [--append-row docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import append_table_row, environment  # noqa: E402
from train_throughput import _release, is_oom, one_rank_group, pretrain_config, run_training  # noqa: E402
from train_throughput import parse_args as throughput_args


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="32768,65536,131072,262144")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--params", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--append-row", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The throughput benchmark's settings, with recomputation on and our step counts.
    targs = throughput_args(
        [
            "--recompute",
            "--params",
            args.params,
            "--device",
            args.device,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--no-profile",
        ]
        + (["--tiny"] if args.tiny else [])
    )
    with one_rank_group(device, args.params):
        return _run(args, targs, device, argv)


def _run(args, targs, device, argv) -> dict:
    env = environment(device)
    command = "python3 benchmarks/long_context.py " + " ".join(argv)
    result = {"env": env, "command": command, "runs": [], "longest_trained": None}
    for seq in [int(s) for s in args.seqs.split(",")]:
        cfg = pretrain_config(targs, seq, 1)
        try:
            run = run_training(cfg, device, args.params, args.steps, args.warmup, False, name=f"seq{seq}")
        except Exception as err:
            _release(device)
            if not is_oom(err):
                raise
            result["runs"].append({"seq": seq, "error": "out of memory"})
            print(f"seq {seq}: out of memory", flush=True)
            break
        _release(device)
        result["runs"].append(dataclasses.asdict(run))
        result["longest_trained"] = seq
        print(
            f"seq {seq}: {run.tokens_per_s:,.0f} tokens/s, step {run.step_ms / 1e3:.2f} s, "
            f"{run.tflops:.0f} TFLOP/s, MFU {run.mfu:.3f}, peak {run.peak_gib or 0:.1f} GiB",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    if args.append_row:
        for r in result["runs"]:
            ok = r.get("error") is None
            append_table_row(
                args.append_row,
                "Long context: Nano3 proxy, one GPU, CP 1, per-block recompute",
                [
                    "date",
                    "GPU",
                    "weights",
                    "seq",
                    "tokens/s",
                    "step s",
                    "TFLOP/s",
                    "MFU",
                    "peak GiB",
                    "software",
                    "command",
                ],
                [
                    env["date"],
                    env["device"],
                    args.params,
                    str(r["seq"]),
                    f"{r['tokens_per_s']:,.0f}" if ok else "out of memory",
                    f"{r['step_ms'] / 1e3:.2f}" if ok else "-",
                    f"{r['tflops']:.0f}" if ok else "-",
                    f"{r['mfu']:.3f}" if ok else "-",
                    "-" if not ok or r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
                    f"torch {env['torch']}, triton {env['triton']}",
                    f"`{command}`",
                ],
                intro="`benchmarks/long_context.py`: the proxy of the throughput table, micro batch 1, "
                "`train.activation_recompute=true` (every block recomputed in backward), "
                "ascending lengths until the first out-of-memory.",
            )
    return result


if __name__ == "__main__":
    import os

    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
