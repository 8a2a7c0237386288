"""The BF16 routed experts' float32 weight gradients (`train.experts_float32_grads`) at the
proxy's shapes: the product alone and the experts' MLP, forward and backward.

1. The weight-gradient product per expert dW[e] = G[rows]^T X[rows] ([E, M, N] from G [R, M],
   X [R, N], BF16): PyTorch's BF16 grouped GEMM (`torch._grouped_mm`, BF16 out: what the BF16
   experts run) against `kernels.expert_wgrad_triton` (float32 out) at each `--configs` tile;
   each one's error per expert against a float64 product of the same operands (the largest
   relative error over experts, and the worst expert).
2. The experts' MLP (`GroupedExperts.mlp`, autograd through PyTorch's grouped GEMM) against
   `train.expert_grads.bf16_expert_mlp` with `ExpertBf16Weight`s: the output and the input
   gradient must be equal bit for bit (the same products), the weight gradients within BF16's
   rounding of each other, the float32 ones closer to float64; forward + backward times.

    PYTHONPATH=src python3 benchmarks/expert_wgrad.py --out expert_wgrad.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import environment, median, time_ms  # noqa: E402


def routed_counts(rows: int, experts: int, generator: torch.Generator) -> torch.Tensor:
    """Rows per expert as a top-k router spreads them: uneven (a few experts take ~2x the mean,
    a few almost none), summing to `rows`."""
    weights = torch.rand(experts, generator=generator) ** 2 + 0.05
    counts = torch.floor(weights / weights.sum() * rows).long()
    counts[0] += rows - int(counts.sum())
    return counts


def rel_errors(ours: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per expert: |ours - exact| / |exact| (Frobenius), float64."""
    diff = (ours.double() - exact).flatten(1).norm(dim=1)
    return diff / exact.flatten(1).norm(dim=1).clamp_min(1e-300)


def exact_weight_grads(g: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(offs.numel(), g.shape[1], x.shape[1], dtype=torch.float64, device=g.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[e] = g[start:end].double().t() @ x[start:end].double()
        start = end
    return out


def product_section(args, device, gen) -> dict:
    from nemotron.kernels.expert_wgrad_triton import expert_weight_grad_triton

    counts = routed_counts(args.rows, args.experts, gen)
    offs = torch.cumsum(counts, 0).to(torch.int32).to(device)
    out: dict = {"rows": args.rows, "experts": args.experts, "largest_expert_rows": int(counts.max())}
    for name, m, n in (
        ("down (G [R, hidden], H [R, ffn])", args.hidden, args.ffn),
        ("up (dH [R, ffn], X [R, hidden])", args.ffn, args.hidden),
    ):
        g = (torch.randn(args.rows, m, generator=gen) * 0.01).to(device, torch.bfloat16)
        x = torch.relu(torch.randn(args.rows, n, generator=gen)).to(device, torch.bfloat16)
        exact = exact_weight_grads(g, x, offs)
        bf16 = torch._grouped_mm(g.t(), x, offs=offs)
        err = rel_errors(bf16, exact)
        row = {
            "bf16_grouped_mm": {
                "ms": median(time_ms(lambda: torch._grouped_mm(g.t(), x, offs=offs), device, 3, args.iters)),
                "max_rel_err": float(err.max()),
            }
        }
        for config in args.configs:
            tiles = tuple(int(v) for v in config.split(","))
            ours = expert_weight_grad_triton(g, x, offs, config=tiles)
            err = rel_errors(ours, exact)
            row[f"triton_f32 {config}"] = {
                "ms": median(
                    time_ms(
                        lambda t=tiles: expert_weight_grad_triton(g, x, offs, config=t), device, 3, args.iters
                    )
                ),
                "max_rel_err": float(err.max()),
                "worst_expert": int(err.argmax()),
            }
        acc = torch.zeros_like(exact, dtype=torch.float32)
        expert_weight_grad_triton(g, x, offs, accumulate_into=acc)
        expert_weight_grad_triton(g, x, offs, accumulate_into=acc)
        row["accumulated_twice_max_rel_err"] = float(rel_errors(acc, 2 * exact).max())
        out[name] = row
        print(name, json.dumps(row), flush=True)
    return out


def mlp_section(args, device, gen) -> dict:
    from nemotron.models.nano3.moe import GroupedExperts
    from nemotron.train.expert_grads import ExpertBf16Weight, bf16_expert_mlp

    counts = routed_counts(args.rows, args.experts, gen).to(device)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    up32 = (torch.randn(args.experts, args.ffn, args.hidden, generator=gen) * 0.02).to(device)
    down32 = (torch.randn(args.experts, args.hidden, args.ffn, generator=gen) * 0.02).to(device)
    x0 = torch.randn(args.rows, args.hidden, generator=gen).to(device, torch.bfloat16)
    g0 = (torch.randn(args.rows, args.hidden, generator=gen) * 0.01).to(device, torch.bfloat16)

    def native():
        up = up32.bfloat16().requires_grad_()
        down = down32.bfloat16().requires_grad_()
        x = x0.clone().requires_grad_()
        out = GroupedExperts.mlp(x, counts, up, down)
        out.backward(g0)
        return out, x.grad, up.grad, down.grad

    up_w = torch.nn.Parameter(ExpertBf16Weight(up32.bfloat16(), torch.float32))
    down_w = torch.nn.Parameter(ExpertBf16Weight(down32.bfloat16(), torch.float32))

    def ours():
        up_w.grad = down_w.grad = None
        x = x0.clone().requires_grad_()
        out = bf16_expert_mlp(x, up_w, down_w, offs)
        out.backward(g0)
        return out, x.grad, up_w.grad, down_w.grad

    n_out, n_dx, n_up, n_down = native()
    o_out, o_dx, o_up, o_down = ours()
    # exact weight gradients from the operands both paths share (h and dh_pre in BF16)
    h_pre = torch._grouped_mm(x0, up32.bfloat16().transpose(-2, -1), offs=offs)
    r = torch.relu(h_pre.float())
    h = r.square().bfloat16()
    grad_h = torch._grouped_mm(g0, down32.bfloat16(), offs=offs)
    dh = (grad_h.float() * 2 * r).bfloat16()
    exact_down = exact_weight_grads(g0, h, offs)
    exact_up = exact_weight_grads(dh, x0, offs)
    result = {
        "out_equal": bool(torch.equal(n_out, o_out)),
        "grad_x_equal": bool(torch.equal(n_dx, o_dx)),
        "grad_dtypes": [str(o_up.dtype), str(o_down.dtype)],
        "native_up_max_rel_err": float(rel_errors(n_up, exact_up).max()),
        "native_down_max_rel_err": float(rel_errors(n_down, exact_down).max()),
        "f32_up_max_rel_err": float(rel_errors(o_up, exact_up).max()),
        "f32_down_max_rel_err": float(rel_errors(o_down, exact_down).max()),
        "native_ms": median(time_ms(native, device, 3, args.iters)),
        "f32_grads_ms": median(time_ms(ours, device, 3, args.iters)),
    }
    print("mlp", json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8192 * 3 * 6, help="routed rows (tokens x top-k)")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2688)
    ap.add_argument("--ffn", type=int, default=1856)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument(
        "--configs",
        default="128,128,64,8,3;128,128,64,4,3;128,256,64,8,3;256,128,64,8,3;128,128,32,4,4",
        help="Triton tiles BLOCK_M,BLOCK_N,BLOCK_K,warps,stages, ';'-separated",
    )
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.configs = [c for c in args.configs.split(";") if c]
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    result = {"env": environment(device), "args": vars(args)}
    result["product"] = product_section(args, device, gen)
    result["mlp"] = mlp_section(args, device, gen)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
