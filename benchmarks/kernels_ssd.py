"""SSD scan on one GPU: Triton kernel vs the chunked PyTorch reference, at the Nano3 Mamba shape.

Checks the Triton forward and backward against a float64 run of the chunked reference (fp32 and
bf16 inputs), times forward and forward+backward (``triton.testing.do_bench``, median), reports
peak memory, a per-kernel profile, and the memory-traffic floor from a measured copy bandwidth.
Imports only torch, triton and nemotron.kernels (run with ``PYTHONPATH=src``)::

    PYTHONPATH=src python benchmarks/kernels_ssd.py --out ssd.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
import triton
from bench_common import peak_extra_mib

from nemotron.kernels.ssd import ssd_chunked_reference
from nemotron.kernels.ssd_triton import SSD_TRITON_CONFIG, ssd_triton


def make_inputs(b, l, h, p, g, n, dtype, seed, with_state=True):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    x = torch.randn(b, l, h, p, device=dev, generator=gen).to(dtype)
    # dt as the mixer makes it: softplus of a bias sampled log-uniform in [1e-3, 1e-1] plus noise.
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, device=dev, generator=gen) * 0.5 - 4.0)
    A = -torch.empty(h, device=dev).uniform_(1.0, 16.0, generator=gen)
    B = torch.randn(b, l, g, n, device=dev, generator=gen).to(dtype)
    C = torch.randn(b, l, g, n, device=dev, generator=gen).to(dtype)
    s0 = torch.randn(b, h, p, n, device=dev, generator=gen) if with_state else None
    return [x, dt, A, B, C, s0]


def fwd_bwd(fn, inputs, gy, gs, chunk):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    y, s = fn(*leaves[:5], chunk, leaves[5])
    torch.autograd.backward([y, s], [gy.to(y.dtype), gs.to(s.dtype)])
    return [y.detach(), s.detach()] + [t.grad for t in leaves if t is not None]


NAMES = ["y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dinitial_state"]


def rel_errors(got, want):
    out = {}
    for name, a, b in zip(NAMES, got, want):
        a, b = a.double(), b.double()
        if not torch.isfinite(a).all():
            out[name] = float("nan")
        else:
            out[name] = (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()
    return out


def check(shape, chunk, dtype, seed):
    inputs = make_inputs(*shape, dtype=dtype, seed=seed)
    gen = torch.Generator(device="cuda").manual_seed(seed + 100)
    b, l, h, p, g, n = shape
    gy = torch.randn(b, l, h, p, device="cuda", generator=gen)
    gs = torch.randn(b, h, p, n, device="cuda", generator=gen)
    ref = fwd_bwd(
        ssd_chunked_reference,
        [t.double() if t is not None else None for t in inputs],
        gy.double(),
        gs.double(),
        chunk,
    )
    res = {"triton": rel_errors(fwd_bwd(ssd_triton, inputs, gy, gs, chunk), ref)}
    res["chunked_reference_same_dtype"] = rel_errors(
        fwd_bwd(ssd_chunked_reference, inputs, gy, gs, chunk), ref
    )
    del ref
    torch.cuda.empty_cache()
    return res


_REF_CACHE = {}


def check_triton_only(shape, chunk, seed=5):
    """bf16 Triton vs a cached float64 reference on one fixed input set."""
    if shape not in _REF_CACHE:
        inputs = make_inputs(*shape, dtype=torch.bfloat16, seed=seed)
        gen = torch.Generator(device="cuda").manual_seed(seed + 100)
        b, l, h, p, g, n = shape
        gy = torch.randn(b, l, h, p, device="cuda", generator=gen)
        gs = torch.randn(b, h, p, n, device="cuda", generator=gen)
        ref = fwd_bwd(
            ssd_chunked_reference,
            [t.double() if t is not None else None for t in inputs],
            gy.double(),
            gs.double(),
            chunk,
        )
        _REF_CACHE[shape] = (inputs, gy, gs, ref)
    inputs, gy, gs, ref = _REF_CACHE[shape]
    return rel_errors(fwd_bwd(ssd_triton, inputs, gy, gs, chunk), ref)


def time_fn(fn, leaves):
    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=leaves, return_mode="median")


def bench(fn, shape, chunk, dtype):
    inputs = make_inputs(*shape, dtype=dtype, seed=7)
    leaves = [t.requires_grad_(True) for t in inputs if t is not None]
    b, l, h, p, g, n = shape
    gy = torch.randn(b, l, h, p, device="cuda").to(dtype)
    gs = torch.randn(b, h, p, n, device="cuda")

    def fwd():
        with torch.no_grad():
            fn(*inputs[:5], chunk, inputs[5])

    def fb():
        y, s = fn(*inputs[:5], chunk, inputs[5])
        torch.autograd.backward([y, s], [gy, gs])

    peak = peak_extra_mib(fb)
    t_f = time_fn(fwd, leaves)
    t_fb = time_fn(fb, leaves)
    return {"fwd_ms": t_f, "fwd_bwd_ms": t_fb, "bwd_ms": t_fb - t_f, "peak_extra_MiB": peak}


def profile(fn, shape, chunk, dtype):
    inputs = make_inputs(*shape, dtype=dtype, seed=7)
    for t in inputs:
        if t is not None:
            t.requires_grad_(True)
    b, l, h, p, g, n = shape
    gy = torch.randn(b, l, h, p, device="cuda").to(dtype)
    gs = torch.randn(b, h, p, n, device="cuda")
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof

    for _ in range(2):
        y, s = fn(*inputs[:5], chunk, inputs[5])
        torch.autograd.backward([y, s], [gy, gs])
    torch.cuda.synchronize()
    with tprof(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            y, s = fn(*inputs[:5], chunk, inputs[5])
            torch.autograd.backward([y, s], [gy, gs])
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            rows.append((ev.key[:60], t / 5 / 1000.0, ev.count // 5))
    rows.sort(key=lambda r: -r[1])
    return rows[:14]


def ceilings():
    x = torch.empty(2**29, device="cuda", dtype=torch.float32).normal_()  # 2 GiB
    y = torch.empty_like(x)
    t = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    copy_bw = 2 * x.numel() * 4 / (t * 1e-3)
    x = y = None  # free the 4 GiB before the matmul
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bm = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = triton.testing.do_bench(lambda: a @ bm, warmup=25, rep=200, return_mode="median")
    mm = 2 * 8192**3 / (t * 1e-3)
    return copy_bw, mm


def floors(shape, chunk, copy_bw):
    """Fewest bytes (each input read once, each output written once; bf16 x/B/C/y, fp32 dt) and FLOPs."""
    b, l, h, p, g, n = shape
    e = 2
    x = b * l * h * p * e
    bc = 2 * b * l * g * n * e
    dt = b * l * h * 4
    fwd_bytes = x + bc + dt + x  # read x, B, C, dt; write y
    bwd_bytes = (x + bc + dt + x) + (x + bc + dt)  # read x, B, C, dt, dy; write dx, dB, dC, ddt
    Q = chunk
    nc = math.ceil(l / Q)
    # Forward matmul work per chunk: C B^T per group, the masked (Q x Q) @ (Q x p) per head,
    # chunk states (p x Q) @ (Q x n) and the state read-out (Q x n) @ (n x p) per head.
    fwd_flops = b * nc * (2 * g * Q * Q * n + h * (Q * Q * p + 2 * Q * p * n + 2 * Q * n * p))
    return {
        "fwd_bytes": fwd_bytes,
        "bwd_bytes": bwd_bytes,
        "fwd_floor_ms": fwd_bytes / copy_bw * 1e3,
        "fwd_bwd_floor_ms": (fwd_bytes + bwd_bytes) / copy_bw * 1e3,
        "fwd_flops_min": fwd_flops,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--length", type=int, default=8192)
    args = ap.parse_args()
    shape = (1, args.length, 64, 64, 8, 128)
    chunk = 128
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "shape_b_l_h_p_g_n": shape,
        "chunk": chunk,
    }
    copy_bw, mm = ceilings()
    result["copy_GBps"] = copy_bw / 1e9
    result["bf16_matmul_TFLOPs"] = mm / 1e12
    result["floor"] = floors(shape, chunk, copy_bw)
    print(f"ceilings: copy {copy_bw / 1e9:.0f} GB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s", flush=True)

    result["check_fp32"] = check(shape, chunk, torch.float32, seed=1)
    print(
        "check fp32 (rel err vs fp64 chunked reference):",
        json.dumps(result["check_fp32"], indent=1),
        flush=True,
    )
    result["check_bf16"] = check(shape, chunk, torch.bfloat16, seed=2)
    print("check bf16:", json.dumps(result["check_bf16"], indent=1), flush=True)
    result["check_ragged_bf16"] = check((2, 1000, 16, 64, 2, 128), chunk, torch.bfloat16, seed=3)
    print("check ragged (b=2,l=1000) bf16:", json.dumps(result["check_ragged_bf16"]["triton"]), flush=True)

    timings = {}
    timings["chunked_reference_bf16"] = bench(ssd_chunked_reference, shape, chunk, torch.bfloat16)
    print("reference:", timings["chunked_reference_bf16"], flush=True)
    default = dict(SSD_TRITON_CONFIG)
    variants = [
        (64, 4, 2, 1024),
        (64, 4, 3, 1024),
        (64, 4, 1, 1024),
        (64, 8, 2, 1024),
        (128, 8, 2, 1024),
        (64, 4, 2, 256),
        (64, 4, 2, 512),
    ]
    for rows, warps, stages, sblock in variants:
        SSD_TRITON_CONFIG.update(block_rows=rows, num_warps=warps, num_stages=stages, state_block=sblock)
        key = f"triton_bf16_rows{rows}_warps{warps}_stages{stages}_sblock{sblock}"
        try:
            timings[key] = bench(ssd_triton, shape, chunk, torch.bfloat16)
            # every timed variant must also be right: worst relative error over outputs and grads
            timings[key]["max_rel_err_vs_fp64"] = max(check_triton_only(shape, chunk).values())
        except Exception as exc:  # a config that fails to compile (e.g. out of shared memory) is reported
            timings[key] = {"error": repr(exc)[:300]}
        print(key, timings[key], flush=True)
    SSD_TRITON_CONFIG.update(default)
    timings["triton_fp32_ieee"] = bench(ssd_triton, shape, chunk, torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = True
    timings["triton_fp32_tf32"] = bench(ssd_triton, shape, chunk, torch.float32)
    result["check_fp32_tf32"] = check(shape, chunk, torch.float32, seed=4)["triton"]
    torch.backends.cuda.matmul.allow_tf32 = False
    print("check fp32 with TF32 dots:", json.dumps(result["check_fp32_tf32"]), flush=True)
    result["timings"] = timings
    try:  # CUPTI may be unavailable (e.g. under gVisor); the timings above stand on their own
        result["profile_triton_bf16_fwd_bwd_ms_per_iter"] = profile(ssd_triton, shape, chunk, torch.bfloat16)
    except Exception as exc:
        result["profile_triton_bf16_fwd_bwd_ms_per_iter"] = [(f"profiler failed: {exc!r}"[:60], 0.0, 0)]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    fl = result["floor"]
    print(
        f"\nSSD b,l,h,p,g,n={shape} chunk={chunk}  floor fwd {fl['fwd_floor_ms'] * 1e3:.0f} us, "
        f"fwd+bwd {fl['fwd_bwd_floor_ms'] * 1e3:.0f} us (bytes / measured copy bandwidth)"
    )
    cols = ["fwd ms", "bwd ms", "f+b ms", "x floor", "peak MiB", "max err"]
    print(f"{'variant':46s} " + " ".join(f"{c:>8s}" for c in cols))
    for k, v in timings.items():
        if "error" in v:
            print(f"{k:46s} error {v['error'][:80]}")
            continue
        print(
            f"{k:46s} {v['fwd_ms']:8.3f} {v['bwd_ms']:8.3f} {v['fwd_bwd_ms']:8.3f} "
            f"{v['fwd_bwd_ms'] / fl['fwd_bwd_floor_ms']:8.1f} {v['peak_extra_MiB']:9.0f} "
            f"{v.get('max_rel_err_vs_fp64', float('nan')):8.1e}"
        )
    print("profile (ms/iter):")
    for name, ms, cnt in result["profile_triton_bf16_fwd_bwd_ms_per_iter"]:
        print(f"  {ms:7.3f} x{cnt} {name}")


if __name__ == "__main__":
    main()
