"""Per-block forward+backward at full Nano3 width: the Mamba-2, attention and MoE (128 experts)
residual blocks, reference path beside fast path (issue 4).

Each block is the model's own `Block` (pre-norm + mixer + residual) at the Nano3 widths, fed a
random bf16 activation [batch, seq, 2688]; one timed call is forward + backward with a random
output gradient (parameter gradients cleared each time, so every call writes them).

Paths:
- `reference`: float32 parameters under bf16 autocast, every kernel dispatcher on its PyTorch
  reference (`nemotron.kernels.fast_paths(False)`: chunked SSD, PyTorch norms, per-expert MoE
  loop) and attention on SDPA's math backend;
- `fast-fp32w`: the fast kernels, but float32 parameters cast by autocast every call (what the
  single-GPU training path did before bf16 compute weights);
- `fast`: bf16 compute parameters (what FSDP2's mixed precision hands the blocks) and the fast
  kernels; attention on SDPA's default choice;
- attention only: `fast-<backend>` for SDPA's flash / cuDNN / efficient backends;
- Mamba-2 only: `fast-stepwise`, `fast` without the fused chain
  (`nemotron.kernels.mamba_chain.fused_chain(False)`): each kernel its own autograd node with
  PyTorch glue between them (what `fast` was before the chain).

Reported per path: median ms of back-to-back calls (the CPU queues the next call while the GPU
runs, as in training; `ms_synced` in the JSON is the median with every call synchronised, launch
gaps included), model TFLOP/s (train/flops.py's per-block formula x 3 x tokens),
MFU against 989 TFLOP/s, peak memory above the block's weights, and the relative error of the
output and input gradient against the reference. The Mamba-2 block is also compared with its
floor: its GEMMs at the measured bf16 matmul rate plus the bytes its other operations must
move at the measured copy bandwidth (each tensor read and written once per pass; see
`mamba_block_floor`).

    PYTHONPATH=src python3 benchmarks/blocks.py --out blocks.json [--append-row docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    TINY_SIZES,
    append_table_row,
    ceilings,
    environment,
    median,
    peak_memory_gib,
    peak_memory_reset,
    time_ms,
)

from nemotron.kernels import fast_paths  # noqa: E402
from nemotron.kernels.mamba_chain import fused_chain  # noqa: E402
from nemotron.models.nano3.config import Nano3Config  # noqa: E402
from nemotron.models.nano3.model import Block  # noqa: E402
from nemotron.models.nano3.moe import set_shared_expert_overlap  # noqa: E402
from nemotron.train import flops  # noqa: E402

SYMBOL = {"mamba": "M", "attention": "*", "moe": "E"}
FORWARD_FLOPS = {"mamba": flops.mamba_forward_flops, "moe": flops.moe_forward_flops}


def block_config(kind: str, **sizes) -> Nano3Config:
    return Nano3Config(hybrid_pattern=SYMBOL[kind], num_layers=1, **sizes)


def block_train_flops(cfg: Nano3Config, kind: str, batch: int, seq: int) -> float:
    per_token = flops.attention_forward_flops(cfg, seq) if kind == "attention" else FORWARD_FLOPS[kind](cfg)
    return 3.0 * per_token * batch * seq


def mamba_block_floor(cfg: Nano3Config, batch: int, seq: int, copy_bps: float, matmul_fps: float) -> dict:
    """Lower bound for one Mamba-2 block's forward+backward: GEMM FLOPs at the matmul ceiling
    plus the unavoidable bytes of everything else at the copy ceiling (bf16 activations, fp32
    dt; each tensor read once and written once per pass; backward moves about twice forward's
    bytes: it reads the saved inputs and the incoming gradient and writes one gradient per input)."""
    t = batch * seq
    h, di = cfg.hidden_size, cfg.mamba_d_inner
    gn = cfg.mamba_num_groups * cfg.mamba_state_size
    nh = cfg.mamba_num_heads
    proj_out = 2 * di + 2 * gn + nh
    gemm_flops = 3 * 2 * t * (h * proj_out + di * h)
    bf = 2
    fwd_bytes = (
        t
        * bf
        * (
            2 * h  # pre-norm: read x, write normed
            + 2 * (di + 2 * gn)  # conv + SiLU: read xBC, write xBC
            + (di + 2 * gn)
            + di  # SSD: read x, B, C; write y
            + 3 * di
            + di  # D skip + gated norm: read y, x, z; write normed
            + 3 * h  # residual: read x and mixer out, write sum
        )
        + t * nh * 4 * 2
    )  # dt: read raw, write softplus (fp32)
    bwd_bytes = 2 * fwd_bytes
    gemm_s = gemm_flops / matmul_fps
    mem_s = (fwd_bytes + bwd_bytes) / copy_bps
    return {
        "gemm_flops": gemm_flops,
        "other_bytes": fwd_bytes + bwd_bytes,
        "gemm_ms": gemm_s * 1e3,
        "memory_ms": mem_s * 1e3,
        "floor_ms": (gemm_s + mem_s) * 1e3,
    }


def sdpa_backend(name: str | None):
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(
        {
            "math": SDPBackend.MATH,
            "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
        }[name]
    )


def paths_for(kind: str, device: torch.device, fp8_recipes: tuple[str, ...] = ()) -> list[dict]:
    ref = {
        "name": "reference",
        "param_dtype": torch.float32,
        "fast": False,
        "sdpa": "math" if kind == "attention" else None,
    }
    paths = [
        ref,
        {"name": "fast-fp32w", "param_dtype": torch.float32, "fast": True, "sdpa": None},
        {"name": "fast", "param_dtype": torch.bfloat16, "fast": True, "sdpa": None},
    ]
    if kind == "attention" and device.type == "cuda":
        paths += [
            {"name": f"fast-{b}", "param_dtype": torch.bfloat16, "fast": True, "sdpa": b}
            for b in ("flash", "cudnn", "efficient")
        ]
    if kind == "mamba":  # the Triton kernels one autograd node each, without the fused chain
        paths += [
            {
                "name": "fast-stepwise",
                "param_dtype": torch.bfloat16,
                "fast": True,
                "sdpa": None,
                "fused_chain": False,
            }
        ]
    if kind == "moe" and device.type == "cuda":  # the shared expert on a side stream
        paths += [
            {
                "name": "fast-overlap",
                "param_dtype": torch.bfloat16,
                "fast": True,
                "sdpa": None,
                "shared_expert_overlap": True,
            }
        ]
    for recipe in fp8_recipes:  # train.fp8: the block's GEMMs in FP8 (train/fp8.py)
        paths += [
            {
                "name": f"fast-fp8-{recipe}",
                "param_dtype": torch.bfloat16,
                "fast": True,
                "sdpa": None,
                "fp8": recipe,
                "shared_expert_overlap": kind == "moe" and device.type == "cuda",
            }
        ]
    return paths


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


# The per-tensor gradient rule of benchmarks/grad_audit.py: a fast path's error may be at most
# GRAD_RATIO x the reference path's bf16 error of the same tensor, or GRAD_FLOOR.
GRAD_RATIO, GRAD_FLOOR = 1.5, 1e-2


def block_gradients_fp32(
    cfg: Nano3Config, master: Block, x0: torch.Tensor, gy: torch.Tensor, device: torch.device
) -> dict:
    """Every parameter's gradient of the block along the reference path in float32, no autocast."""
    block = Block(cfg, 0).to(device)
    block.load_state_dict(master.state_dict())
    x = x0.float().requires_grad_(True)
    with fast_paths(False):
        y, _ = block(x)
    y.backward(gy.float())
    grads = {n: p.grad.detach().float().clone() for n, p in block.named_parameters() if p.grad is not None}
    del block, x, y
    return grads


def profile_kernels(fn, iters: int, limit: int = 15) -> list[dict]:
    """Device time per kernel over `iters` calls of `fn` (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", 0) or 0
        if t > 0:
            rows.append({"name": evt.key[:100], "ms_per_call": t / 1e3 / iters, "count": evt.count // iters})
    rows.sort(key=lambda r: -r["ms_per_call"])
    return rows[:limit]


def run_block(
    kind: str,
    cfg: Nano3Config,
    batch: int,
    seq: int,
    device: torch.device,
    warmup: int,
    iters: int,
    caps: dict,
    only: list[str] | None = None,
    profile: bool = False,
    profile_top: int = 15,
    fp8_recipes: tuple[str, ...] = (),
    fp8_layers: tuple[str, ...] = (),
) -> list[dict]:
    torch.manual_seed(0)
    with torch.device(device):
        master = Block(cfg, 0)
    gen = torch.Generator(device=device).manual_seed(1)
    x0 = torch.randn(batch, seq, cfg.hidden_size, device=device, generator=gen).bfloat16()
    gy = torch.randn(batch, seq, cfg.hidden_size, device=device, generator=gen).bfloat16()
    total_flops = block_train_flops(cfg, kind, batch, seq)
    rows, ref_out = [], None
    truth = block_gradients_fp32(cfg, master, x0, gy, device)  # per-tensor ground truth
    for path in paths_for(kind, device, fp8_recipes):
        if only and path["name"] not in only and path["name"] != "reference" and not path.get("fp8"):
            continue
        block = Block(cfg, 0).to(device)
        block.load_state_dict(master.state_dict())
        block.to(path["param_dtype"])  # the router's balancing buffers stay float32
        if path.get("fp8"):
            from nemotron.train.fp8 import Fp8Config, apply_fp8

            apply_fp8(block, Fp8Config(enabled=True, recipe=path["fp8"], layers=list(fp8_layers)), device)
        set_shared_expert_overlap(block, path.get("shared_expert_overlap", False))
        params = list(block.parameters())
        x = x0.clone().requires_grad_(True)

        def step():
            for p in params:
                p.grad = None
            x.grad = None
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y, _ = block(x)
            y.backward(gy)
            return y

        row = {
            "block": kind,
            "path": path["name"],
            "batch": batch,
            "seq": seq,
            "experts": cfg.num_experts if kind == "moe" else None,
        }
        try:
            with (
                fast_paths(path["fast"]),
                sdpa_backend(path["sdpa"]),
                fused_chain(path.get("fused_chain", True)),
            ):
                out = step().detach()
                dx = x.grad.detach().clone()
                # Every parameter's gradient, tensor by tensor (the residual dominates the block
                # output and dx, so these show the mixer's own error; one aggregate over all
                # tensors would hide a wrong small one).
                dparams = {
                    n: rel(p.grad, truth[n]) for n, p in block.named_parameters() if p.grad is not None
                }
                peak_memory_reset(device)
                base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                times = time_ms(step, device, warmup, iters)
                peak = peak_memory_gib(device)
                synced = time_ms(step, device, 1, iters, sync_each=True)
                if (
                    profile
                    and (path["name"] in ("fast", "fast-overlap") or path.get("fp8"))
                    and device.type == "cuda"
                ):
                    row["kernels"] = profile_kernels(step, 3, limit=profile_top)
        except (RuntimeError, NotImplementedError) as err:  # a backend that refuses the shape
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            rows.append(row)
            print(f"{kind:9s} {path['name']:12s} failed: {row['error']}", flush=True)
            continue
        ms = median(times)
        row.update(
            {
                "ms": ms,
                "ms_min": min(times),
                "ms_synced": median(synced),
                "tflops": total_flops / (ms * 1e-3) / 1e12,
                "mfu": total_flops / (ms * 1e-3) / flops.H200_BF16_PEAK_FLOPS,
                "peak_extra_gib": None if peak is None else peak - base / 2**30,
            }
        )
        row["param_errors"] = dparams  # vs the fp32 reference without autocast
        if path["name"] == "reference":
            ref_out = (out, dx, dparams)
        else:
            row["rel_err_out"] = rel(out, ref_out[0])
            row["rel_err_dx"] = rel(dx, ref_out[1])
            # The tensor whose error is largest against the reference path's own bf16 error.
            worst = max(dparams, key=lambda n: dparams[n] / max(ref_out[2][n], GRAD_FLOOR / GRAD_RATIO))
            row["worst_param"] = {
                "tensor": worst,
                "error": dparams[worst],
                "reference_bf16": ref_out[2][worst],
                "ok": dparams[worst] <= max(GRAD_RATIO * ref_out[2][worst], GRAD_FLOOR),
            }
        if kind == "mamba" and caps.get("copy_GBps"):
            floor = mamba_block_floor(
                cfg, batch, seq, caps["copy_GBps"] * 1e9, caps["bf16_matmul_TFLOPs"] * 1e12
            )
            row["floor"] = floor
            row["x_floor"] = ms / floor["floor_ms"]
        rows.append(row)
        print(
            f"{kind:9s} {path['name']:12s} {ms:8.3f} ms (synced {row['ms_synced']:.3f}) {row['tflops']:7.1f} TFLOP/s "
            f"MFU {row['mfu']:.3f} peak+ {row['peak_extra_gib'] or 0:.2f} GiB "
            f"err out/dx {row.get('rel_err_out', 0):.1e}/{row.get('rel_err_dx', 0):.1e}"
            + (
                f" worst dW {row['worst_param']['tensor']} {row['worst_param']['error']:.1e}"
                f" (ref {row['worst_param']['reference_bf16']:.1e})"
                if "worst_param" in row
                else ""
            )
            + (f" floor x{row['x_floor']:.2f}" if "x_floor" in row else ""),
            flush=True,
        )
        for k in row.get("kernels", []):
            print(f"    {k['ms_per_call']:7.3f} ms {k['count']:3d}x {k['name']}", flush=True)
        block = params = x = out = dx = dparams = None  # free this path's memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", default="mamba,attention,moe")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--paths", default=None, help="comma list of paths to run besides the reference")
    ap.add_argument("--tiny", action="store_true", help="small widths (CPU smoke test)")
    ap.add_argument("--profile", action="store_true", help="top kernels of each block's fast path")
    ap.add_argument("--profile-top", type=int, default=15, help="how many kernels --profile lists")
    ap.add_argument(
        "--fp8", default="", help="comma list of train.fp8 recipes to time as paths fast-fp8-<recipe>"
    )
    ap.add_argument(
        "--fp8-layers",
        default="mamba,attention,shared_expert,mlp,experts",
        help="train.fp8.layers of the fast-fp8 paths (default: every FP8-capable layer)",
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    ap.add_argument("--append-row", default=None, help="append result rows to this Markdown file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sizes = {"num_experts": args.experts}
    if args.tiny:
        sizes.update({k: v for k, v in TINY_SIZES.items() if k != "num_experts"}, vocab_size=256)
    caps = ceilings(device)
    env = environment(device)
    print(f"{env['device']}; torch {env['torch']}, triton {env['triton']}; ceilings: {caps}", flush=True)
    result = {
        "env": env,
        "ceilings": caps,
        "command": "python3 benchmarks/blocks.py " + " ".join(argv or sys.argv[1:]),
        "rows": [],
    }
    only = args.paths.split(",") if args.paths else None
    for kind in args.blocks.split(","):
        cfg = block_config(kind, **sizes)
        result["rows"] += run_block(
            kind,
            cfg,
            args.batch,
            args.seq,
            device,
            args.warmup,
            args.iters,
            caps,
            only,
            args.profile,
            args.profile_top,
            tuple(r for r in args.fp8.split(",") if r),
            tuple(x for x in args.fp8_layers.split(",") if x),
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.append_row:
        header = [
            "date",
            "GPU",
            "block",
            "path",
            "batch x seq",
            "ms",
            "TFLOP/s",
            "MFU",
            "peak extra GiB",
            "rel err out / dx",
            "worst dW tensor: err (ref bf16)",
            "vs floor",
            "software",
            "command",
        ]
        for r in result["rows"]:
            if "ms" not in r:
                continue
            name = r["block"] + (f" ({r['experts']} experts)" if r["experts"] else "")
            append_table_row(
                args.append_row,
                "Per-block forward+backward (full Nano3 width)",
                header,
                [
                    env["date"],
                    env["device"],
                    name,
                    r["path"],
                    f"{r['batch']}x{r['seq']}",
                    f"{r['ms']:.2f}",
                    f"{r['tflops']:.0f}",
                    f"{r['mfu']:.3f}",
                    "-" if r["peak_extra_gib"] is None else f"{r['peak_extra_gib']:.2f}",
                    "-" if "rel_err_out" not in r else f"{r['rel_err_out']:.1e} / {r['rel_err_dx']:.1e}",
                    "-"
                    if "worst_param" not in r
                    else f"`{r['worst_param']['tensor']}`: {r['worst_param']['error']:.1e} ({r['worst_param']['reference_bf16']:.1e})",
                    "-" if "x_floor" not in r else f"{r['x_floor']:.2f}x of {r['floor']['floor_ms']:.2f} ms",
                    f"torch {env['torch']}, triton {env['triton']}",
                    f"`{result['command']}`",
                ],
                intro="`benchmarks/blocks.py`: one residual block (pre-norm + mixer + residual), "
                "forward + backward, median of timed calls. MFU against 989 TFLOP/s. "
                "Mamba-2 floor: GEMMs at the measured bf16 matmul rate + other bytes at the "
                "measured copy bandwidth (see the script).",
            )
    return result


if __name__ == "__main__":
    main()
