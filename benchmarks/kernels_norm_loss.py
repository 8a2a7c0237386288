"""Gated RMSNorm (Triton vs reference) and the chunked LM-head loss (vs full logits) on one GPU.

Nano3 shapes, bf16: gated norm over [8192, 4096] in groups of 512; LM head hidden [8192, 2688]
x weight [131072, 2688]. Reports errors against float64/float32 references, median times
(``triton.testing.do_bench``) and peak extra memory. Imports only torch, triton, nemotron.kernels::

    PYTHONPATH=src python benchmarks/kernels_norm_loss.py --out norm_loss.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import triton
from bench_common import peak_extra_mib

from nemotron.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from nemotron.kernels.rmsnorm import gated_rmsnorm_reference, gated_rmsnorm_triton
from nemotron.kernels.rmsnorm_triton import RMSNORM_TRITON_CONFIG


def rel(a, b):
    a, b = a.double(), b.double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def peak_and_time(fb, leaves):
    peak = peak_extra_mib(fb)
    ms = triton.testing.do_bench(fb, warmup=25, rep=200, grad_to_none=leaves, return_mode="median")
    return {"fwd_bwd_ms": ms, "peak_extra_MiB": peak}


def norm_section():
    t, d, gs = 8192, 4096, 512
    y = torch.randn(t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(d, device="cuda")).to(torch.bfloat16).requires_grad_(True)
    gout = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)

    def run(fn, cast):
        leaves = [a.detach().to(cast).requires_grad_(True) for a in (y, z, w)]
        out = fn(*leaves[:2], leaves[2], gs)
        out.backward(gout.to(cast))
        return [out] + [a.grad for a in leaves]

    ref = run(gated_rmsnorm_reference, torch.float64)
    errs = {
        "triton": [rel(a, b) for a, b in zip(run(gated_rmsnorm_triton, torch.bfloat16), ref)],
        "reference_bf16": [rel(a, b) for a, b in zip(run(gated_rmsnorm_reference, torch.bfloat16), ref)],
    }
    res = {"rel_err_out_dy_dz_dw": errs}
    res["reference"] = peak_and_time(lambda: gated_rmsnorm_reference(y, z, w, gs).backward(gout), [y, z, w])
    default = dict(RMSNORM_TRITON_CONFIG)
    for elems, warps in [(8192, 4), (4096, 4), (8192, 8), (16384, 8), (2048, 4)]:
        RMSNORM_TRITON_CONFIG.update(elements_per_program=elems, num_warps=warps)
        res[f"triton_e{elems}_w{warps}"] = peak_and_time(
            lambda: gated_rmsnorm_triton(y, z, w, gs).backward(gout), [y, z, w]
        )
    RMSNORM_TRITON_CONFIG.update(default)
    # Floor: read y, z, w; write out (fwd); read y, z, dout; write dy, dz (bwd).
    res["bytes_min"] = t * d * 2 * (3 + 5)
    return res


def loss_section():
    n, h, v = 8192, 2688, 131072
    hidden = (torch.randn(n, h, device="cuda") * 1.0).to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(v, h, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, v, (n,), device="cuda")

    def run(fn, **kw):
        hh, ww = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
        loss = fn(hh, ww, labels, **kw)
        loss.backward()
        return [loss.detach(), hh.grad, ww.grad]

    ref = run(linear_cross_entropy_reference)
    res = {
        "rel_err_loss_dh_dw": {
            "triton_grad_in_forward": [rel(a, b) for a, b in zip(run(linear_cross_entropy), ref)],
            "triton_recompute": [
                rel(a, b) for a, b in zip(run(linear_cross_entropy, grad_in_forward=False), ref)
            ],
            "torch_grad_in_forward": [
                rel(a, b) for a, b in zip(run(linear_cross_entropy, backend="torch"), ref)
            ],
        }
    }
    del ref
    torch.cuda.empty_cache()
    for name, kw in [
        ("triton_grad_in_forward_4096", {}),
        ("triton_recompute_4096", {"grad_in_forward": False}),
        ("triton_grad_in_forward_2048", {"chunk_size": 2048}),
        ("triton_grad_in_forward_8192", {"chunk_size": 8192}),
        ("torch_grad_in_forward_4096", {"backend": "torch"}),
    ]:
        res[name] = peak_and_time(
            lambda kw=kw: linear_cross_entropy(hidden, weight, labels, **kw).backward(), [hidden, weight]
        )
    res["full_logits_reference"] = peak_and_time(
        lambda: linear_cross_entropy_reference(hidden, weight, labels).backward(), [hidden, weight]
    )
    res["matmul_flops"] = 3 * 2 * n * h * v
    from nemotron.kernels.cross_entropy import _FP32_OUT_ADDMM

    res["addmm_out_dtype_fp32_used"] = _FP32_OUT_ADDMM["ok"]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    result["gated_rmsnorm"] = norm_section()
    print("gated_rmsnorm:", json.dumps(result["gated_rmsnorm"]), flush=True)
    result["linear_cross_entropy"] = loss_section()
    print("linear_cross_entropy:", json.dumps(result["linear_cross_entropy"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    ce = result["linear_cross_entropy"]
    for k, v in ce.items():
        if isinstance(v, dict) and "fwd_bwd_ms" in v:
            print(
                f"LM head {k:30s} {v['fwd_bwd_ms']:8.2f} ms  {ce['matmul_flops'] / v['fwd_bwd_ms'] / 1e9:6.0f} TFLOP/s "
                f"peak +{v['peak_extra_MiB']:.0f} MiB"
            )
    gn = result["gated_rmsnorm"]
    for k, v in gn.items():
        if not (isinstance(v, dict) and "fwd_bwd_ms" in v):
            continue
        print(
            f"gated norm {k:18s} {v['fwd_bwd_ms'] * 1e3:8.0f} us  {gn['bytes_min'] / v['fwd_bwd_ms'] / 1e6:6.0f} GB/s(eff) "
            f"peak +{v['peak_extra_MiB']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
