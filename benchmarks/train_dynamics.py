"""Training dynamics of the fast path against the reference path on real text (issue 16).

A full-width model small enough for the reference path (default `MEMEM*EM`: 4 Mamba-2, 3 MoE,
1 attention block at Nano3 widths, 16 routed experts, the tokenizer's vocabulary) trains for
`--steps` optimizer steps on a prepared blend (`nemotron nano3 data prep pretrain -c tiny`: the
embedded corpus), with the library's AdamW groups, WSD schedule, gradient clipping and
expert-bias update, once per `--path`:

- `fast`: the fast GPU path (Triton kernels, fused Mamba chain) under bf16 autocast;
- `reference`: `fast_paths(False)` under the same bf16 autocast;
- `reference-fp32`: `fast_paths(False)` without autocast (the float32 baseline).

Same seed, initialisation and data order on every path. Each run records the loss of every
step and every Mamba block's `A_log` and `dt_bias` after every step; `--compare` reads the
runs' JSON files and reports how far the fast path is from the reference bf16 path, next to how
far the reference bf16 path is from float32 (the spread bf16 itself causes).

    PYTHONPATH=src python3 benchmarks/train_dynamics.py --blend out/blend.json --path fast --out fast.json
    PYTHONPATH=src python3 benchmarks/train_dynamics.py --compare fast.json reference.json reference-fp32.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment, now_utc  # noqa: E402

from nemotron.data.gpt_dataset import build_split_dataset  # noqa: E402
from nemotron.kernels import fast_paths  # noqa: E402
from nemotron.models.nano3 import Nano3Config, Nano3ForCausalLM  # noqa: E402
from nemotron.train.balancing import update_expert_biases  # noqa: E402
from nemotron.train.config import OptimizerConfig, SchedulerConfig  # noqa: E402
from nemotron.train.optimizer import build_optimizer, set_learning_rate  # noqa: E402
from nemotron.train.schedule import learning_rate  # noqa: E402

PATHS = {"fast": (True, True), "reference": (False, True), "reference-fp32": (False, False)}


def model_config(pattern: str, experts: int, vocab: int, tiny: bool) -> Nano3Config:
    if tiny:  # CPU smoke test of the script
        return Nano3Config(
            hybrid_pattern=pattern,
            num_layers=len(pattern),
            hidden_size=32,
            vocab_size=vocab,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            mamba_num_heads=2,
            mamba_head_dim=16,
            mamba_state_size=8,
            mamba_num_groups=1,
            mamba_chunk_size=16,
            num_experts=4,
            moe_top_k=2,
            moe_ffn_hidden_size=16,
            moe_shared_expert_hidden_size=16,
            ffn_hidden_size=32,
        )
    return Nano3Config(hybrid_pattern=pattern, num_layers=len(pattern), num_experts=experts, vocab_size=vocab)


def mamba_params(model: Nano3ForCausalLM) -> dict[str, list[float]]:
    return {
        name: p.detach().float().cpu().tolist()
        for name, p in model.named_parameters()
        if name.endswith(("mixer.A_log", "mixer.dt_bias"))
    }


def train(args, path: str) -> dict:
    fast, bf16 = PATHS[path]
    device = torch.device(args.device)
    cfg = model_config(args.pattern, args.experts, args.vocab, args.tiny)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = Nano3ForCausalLM(cfg)
    opt_cfg = OptimizerConfig(lr=args.lr, min_lr=args.lr / 10)
    sched = SchedulerConfig(
        style="wsd", warmup_tokens=args.warmup * args.batch * args.seq, stable_fraction_end=0.8
    )
    optimizer = build_optimizer(model, opt_cfg)
    data = build_split_dataset(
        args.blend,
        "train",
        args.steps * args.batch,
        args.seq,
        args.seed,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
    )
    tokens_per_step, total = args.batch * args.seq, args.steps * args.batch * args.seq
    record = {
        "path": path,
        "loss": [],
        "lm_loss": [],
        "grad_norm": [],
        "lr": [],
        "params": [mamba_params(model)],
    }
    start = time.perf_counter()
    for step in range(args.steps):
        items = [data[step * args.batch + i] for i in range(args.batch)]
        batch = {
            k: torch.stack([it[k] for it in items]).to(device) for k in ("tokens", "labels", "loss_mask")
        }
        lr = learning_rate(step * tokens_per_step, total, sched, opt_cfg)
        set_learning_rate(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        with fast_paths(fast), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"])
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        update_expert_biases(model.moe_layers(), args.bias_rate)
        record["loss"].append(out.loss.item())
        record["lm_loss"].append(out.lm_loss.item())
        record["grad_norm"].append(grad_norm.item())
        record["lr"].append(lr)
        record["params"].append(mamba_params(model))
        if step % 20 == 0 or step == args.steps - 1:
            print(
                f"{path:15s} step {step:4d} loss {out.lm_loss.item():.4f} grad norm {grad_norm.item():.3f}",
                flush=True,
            )
    record["seconds"] = time.perf_counter() - start
    return record


def _distance(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    return math.sqrt(sum((x - y) ** 2 for n in a for x, y in zip(a[n], b[n])))


def compare(runs: list[dict]) -> dict:
    """Fast vs reference bf16, beside reference bf16 vs float32: the LM loss (mean absolute
    difference over the last 50 steps, and at the end) and the A_log / dt_bias trajectories
    (the distance between the two runs' values relative to how far the reference moved)."""
    by = {r["path"]: r for r in runs}

    def pair(a: str, b: str) -> dict:
        ra, rb = by[a], by[b]
        n = min(len(ra["lm_loss"]), len(rb["lm_loss"]))
        tail = range(max(0, n - 50), n)
        out = {
            "last50_mean_abs_loss_diff": sum(abs(ra["lm_loss"][i] - rb["lm_loss"][i]) for i in tail)
            / len(tail),
            "final_loss": (ra["lm_loss"][n - 1], rb["lm_loss"][n - 1]),
            # The two LM-loss curves every 10 steps, for the docs' table.
            "curves": {str(i): (ra["lm_loss"][i], rb["lm_loss"][i]) for i in range(0, n, 10)},
        }
        for kind in ("A_log", "dt_bias"):
            pa = [{k: v for k, v in p.items() if k.endswith(kind)} for p in ra["params"]]
            pb = [{k: v for k, v in p.items() if k.endswith(kind)} for p in rb["params"]]
            moved = [_distance(pb[t], pb[0]) for t in range(len(pb))]
            apart = [_distance(pa[t], pb[t]) for t in range(len(pb))]
            checkpoints = [t for t in (10, 50, 100, 150, n) if t < len(pb)]
            out[kind] = {
                str(t): {"apart": apart[t], "moved": moved[t], "ratio": apart[t] / max(moved[t], 1e-30)}
                for t in checkpoints
            }
        return out

    result = {}
    if {"fast", "reference"} <= set(by):
        result["fast_vs_reference"] = pair("fast", "reference")
    if {"reference", "reference-fp32"} <= set(by):
        result["reference_vs_fp32"] = pair("reference", "reference-fp32")
    for extra in [p for p in by if p not in PATHS]:  # e.g. "fast-before" from an older tree
        result[f"{extra}_vs_reference"] = pair(extra, "reference")
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blend", help="a prepared blend.json (train split)")
    ap.add_argument("--path", choices=sorted(PATHS), default="fast")
    ap.add_argument("--label", default=None, help="name the run (default: the path)")
    ap.add_argument("--pattern", default="MEMEM*EM")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20, help="warmup steps")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--bias-rate", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", nargs="+", default=None, help="run JSON files to compare")
    args = ap.parse_args(argv)
    if args.compare:
        result = compare([json.loads(Path(p).read_text()) for p in args.compare])
        print(json.dumps(result, indent=1))
    else:
        if not args.blend:
            ap.error("--blend is required to train")
        result = {
            "when": now_utc(),
            "env": environment(torch.device(args.device)),
            "args": {k: v for k, v in vars(args).items() if k != "compare"},
            **train(args, args.path),
        }
        if args.label:
            result["path"] = args.label
    if args.out:
        Path(args.out).write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
