"""FP8 vs BF16 at the proxy's exact GEMM shapes, on one GPU: what FP8 can save at most.

Its parts, each in the same process and on the same GPU:

1. every GEMM of one proxy training step (the Nano3 proxy of `train_throughput.py`: micro batch
   x sequence tokens per micro-batch, 6 Mamba, 2 attention, 6 MoE blocks, the LM head in its
   loss's 4096-row chunks), forward, input-gradient and weight-gradient shapes: BF16 `torch.mm`
   against FP8 `torch._scaled_mm` on operands already in FP8 (tensorwise and rowwise scales);
   summed per layer kind and step, this is the GEMM time FP8 could save if quantization were
   free;
2. the routed experts' MLP (up, squared ReLU, down) forward + backward on the proxy's rows:
   BF16 grouped GEMMs (the model's `GroupedExperts`), torchao's FP8 grouped GEMM
   (what `Float8GroupedExperts` ran before, with torchao's own padding) and `nemotron.train.fp8_grouped.fp8_expert_mlp`, plus
   the new path's outputs and gradients against its emulation (same roundings, float32 products)
   and against BF16, per tensor;
   `fp8_nemotron_reused` is the same inside `reuse_quantized_weights` (the weights' FP8 copies
   made once and reused: a micro-batch's cost when training accumulates several);
3. the quantization passes alone as bandwidth: the compiled reference (`torch.compile` of
   `quantize_rows`) against the one-pass Triton kernel (`kernels.fp8.rowwise`), with the
   kernel's values and scales checked bit for bit against the reference;
4. (`lm_head`) the LM head's chunked loss (`linear_cross_entropy`, one micro-batch's rows, the
   proxy's vocabulary) forward + backward in BF16 and in FP8 (`fp8=True`: all three products
   in FP8), time, peak memory beyond the inputs, and the FP8 gradients against BF16's and
   against float64, per tensor;
5. (`fast_accum`) every FP8 GEMM of part 1 (tensorwise) and the routed experts' two grouped
   shapes (rowwise) with and without `use_fast_accum`: time, and each result's error against
   the float32 product of the same float8 operands (`train.fp8.fast_accum`);
6. (`linears`) each distinct dense linear of the proxy as training runs it (torchao's
   `Float8Linear` with this project's `float8_linear_config`, compiled as `apply_fp8` does)
   against a BF16 `nn.Linear`: forward + backward of one micro-batch, and the kernels of one
   profiled call (which GEMMs cuBLAS picks, what the casts cost). Needs torchao.

7. (`gathered_forms`) `train.fp8.experts_fsdp_float8_all_gather`'s once-per-step work on one
   expert weight (`fp8_gather.pack_forms`: both FP8 forms packed as FSDP2's all-gather input)
   against its parts, and the routed experts' forward and input-gradient grouped GEMMs on the
   forms the experts quantize themselves against the same values as views of the gathered
   buffer (and with only the values or only the scales taken from it), timed alternately.

Parts run with `--parts` (default `gemms,experts,quant`; also `expert_wgrad`,
`grouped_autotune`, `lm_head`, `fast_accum`, `linears`, `gathered_forms`, `fp8_wgrad`,
`lm_head_kernels`: the LM-head loss's logit-gradient kernel per tile, alone and at the training
layout, and its row kernel per configuration; `grouped_triton`: `kernels.fp8_grouped_triton` against PyTorch's CUTLASS grouped product; it
ends with the fastest tiles in the form `train.fp8.experts_grouped_tiles` takes, as the last
line `GROUPED_TRITON_BEST_TILES=M,N,K,stages,warps,tma,persistent` and in the JSON's
`grouped_triton.best`).

    python3 benchmarks/fp8_gemms.py --out $OUT/fp8_gemms.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import environment, time_ms  # noqa: E402

from nemotron.kernels.fp8 import quantize_rows, quantize_tensor, relu2_rows, reuse_quantized_weights, rowwise  # noqa: E402
from nemotron.models.nano3.config import Nano3Config  # noqa: E402
from nemotron.train.fp8_grouped import fp8_expert_mlp  # noqa: E402

F8 = torch.float8_e4m3fn


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def proxy_gemms(cfg: Nano3Config, tokens: int, lm_chunk: int) -> list[tuple[str, int, int, int, int]]:
    """(kind, M, N, K, calls per micro-batch) for every dense GEMM of one micro-batch."""
    h = cfg.hidden_size
    d_inner = cfg.mamba_num_heads * cfg.mamba_head_dim
    in_proj = 2 * d_inner + 2 * cfg.mamba_num_groups * cfg.mamba_state_size + cfg.mamba_num_heads
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    linears = [
        ("mamba", in_proj, h, 6),
        ("mamba", h, d_inner, 6),
        ("attention", q, h, 2),
        ("attention", kv, h, 4),  # k and v (FP8 keeps them separate)
        ("attention", h, q, 2),
        ("shared_expert", cfg.moe_shared_expert_hidden_size, h, 6),
        ("shared_expert", h, cfg.moe_shared_expert_hidden_size, 6),
    ]
    out = []
    for kind, n_out, k_in, count in linears:
        out += [
            (kind, tokens, n_out, k_in, count),  # forward
            (kind, tokens, k_in, n_out, count),  # input gradient
            (kind, n_out, k_in, tokens, count),  # weight gradient
        ]
    chunks = tokens // lm_chunk
    v = cfg.vocab_size
    out += [
        ("lm_head", lm_chunk, v, h, chunks),
        ("lm_head", lm_chunk, h, v, chunks),
        ("lm_head", v, h, lm_chunk, chunks),
    ]
    return out


def time_gemm(m: int, n: int, k: int, dev, warmup: int, iters: int) -> dict:
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    bf16 = median(time_ms(lambda: a @ b.t(), dev, warmup, iters))
    aq, bq = a.to(F8), b.to(F8)
    one = torch.ones((), device=dev)
    tensorwise = median(
        time_ms(lambda: torch._scaled_mm(aq, bq.t(), one, one, out_dtype=torch.bfloat16), dev, warmup, iters)
    )
    sa = torch.ones(m, 1, device=dev)
    sb = torch.ones(1, n, device=dev)
    rowwise = median(
        time_ms(lambda: torch._scaled_mm(aq, bq.t(), sa, sb, out_dtype=torch.bfloat16), dev, warmup, iters)
    )
    return {"bf16_ms": bf16, "fp8_tensorwise_ms": tensorwise, "fp8_rowwise_ms": rowwise}


def routed_rows(tokens: int, cfg: Nano3Config, dev, seed: int = 0) -> torch.Tensor:
    """Per-expert row counts of one micro-batch's routing: tokens * top_k rows over the
    experts, uneven (a few experts get 2-3x the mean, one gets none)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(cfg.num_experts, generator=g) + 0.3
    weights[0] = 0.0  # an empty expert
    weights[1] *= 3.0
    rows = tokens * cfg.moe_top_k
    counts = torch.floor(weights / weights.sum() * rows).long()
    counts[2] += rows - counts.sum()
    return counts.to(dev)


def expert_mlp_part(cfg: Nano3Config, tokens: int, dev, warmup: int, iters: int) -> dict:
    from nemotron.models.nano3.moe import GroupedExperts

    counts = routed_rows(tokens, cfg, dev)
    rows = int(counts.sum())
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    # the same rows with every expert's group a multiple of 16 (what torchao's path needs, and
    # what the FP8 grouped GEMM's tiles like)
    aligned = counts // 16 * 16
    aligned[2] += rows - aligned.sum()
    aligned_offs = torch.cumsum(aligned, 0, dtype=torch.int32)
    torch.manual_seed(0)
    experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size, 0.02, 0.02 / 4)
    experts = experts.to(dev, torch.bfloat16)
    x = torch.randn(rows, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    grad = torch.randn(rows, cfg.hidden_size, device=dev, dtype=torch.bfloat16) * 1e-3

    def run(fn):
        def step():
            xi = x.detach().requires_grad_()
            experts.zero_grad(set_to_none=True)
            out = fn(xi)
            out.backward(grad)
            return out, xi.grad, experts.up_proj.grad, experts.down_proj.grad

        return step

    paths = {
        "bf16": run(lambda xi: experts(xi, counts)),
        "fp8_nemotron": run(lambda xi: fp8_expert_mlp(xi, experts.up_proj, experts.down_proj, offs)),
        "fp8_nemotron_reused": run(
            lambda xi: fp8_expert_mlp(xi, experts.up_proj, experts.down_proj, offs, owner=experts)
        ),
        "bf16_aligned": run(lambda xi: experts(xi, aligned)),
        "fp8_nemotron_aligned": run(
            lambda xi: fp8_expert_mlp(xi, experts.up_proj, experts.down_proj, aligned_offs)
        ),
    }
    try:
        from torchao.prototype.moe_training.fp8_grouped_mm import (
            _to_fp8_rowwise_then_scaled_grouped_mm as ao_grouped_mm,
        )

        from nemotron.kernels.relu2 import relu2

        def torchao_mlp(xi):  # groups already multiples of 16: no padding pass
            up_t, down_t = experts.up_proj.transpose(-2, -1), experts.down_proj.transpose(-2, -1)
            h = relu2(
                ao_grouped_mm(xi, up_t, aligned_offs, torch.bfloat16, pad_token_groups_for_grouped_mm=False)
            )
            return ao_grouped_mm(
                h, down_t, aligned_offs, torch.bfloat16, pad_token_groups_for_grouped_mm=False
            )

        paths["fp8_torchao_aligned"] = run(torchao_mlp)
    except Exception as err:  # noqa: BLE001 - report and go on
        print(f"torchao path unavailable: {err}")
    result: dict = {"rows": rows, "counts_min_max": [int(counts.min()), int(counts.max())]}
    outs = {}
    for name, step in paths.items():
        with reuse_quantized_weights(name.endswith("_reused")):
            ms = median(time_ms(step, dev, warmup, iters))
            outs[name] = [t.float().clone() for t in step()]
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
        result[f"{name}_fwd_bwd_ms"] = ms
        result[f"{name}_peak_extra_gib"] = peak
        print(f"experts {name}: {ms:.3f} ms fwd+bwd, peak +{peak:.2f} GiB")
    emulated = run(lambda xi: fp8_expert_mlp(xi, experts.up_proj, experts.down_proj, offs, emulate=True))()
    names = ["out", "grad_x", "grad_up", "grad_down"]

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    result["fp8_nemotron_vs_emulation_rel"] = {
        n: rel(outs["fp8_nemotron"][i], emulated[i].float()) for i, n in enumerate(names)
    }
    for name in outs:
        if name.startswith("fp8") and "aligned" not in name:
            result[f"{name}_vs_bf16_rel"] = {
                n: rel(outs[name][i], outs["bf16"][i]) for i, n in enumerate(names)
            }
    # the empty expert's weight gradient must be exactly zero
    result["fp8_nemotron_empty_expert_grad_max"] = float(outs["fp8_nemotron"][2][0].abs().max())
    return result


def expert_wgrad_part(cfg: Nano3Config, tokens: int, dev, warmup: int, iters: int) -> dict:
    """The routed experts' two weight-gradient products at the proxy's rows: BF16
    `torch._grouped_mm` (what `fp8_expert_mlp` runs) against FP8 `torch._scaled_grouped_mm` with
    the contraction over each expert's rows (operands transposed, every group padded to 16
    rows, one scale per (expert, output row)), plus candidate passes that make those operands
    (compiled; bandwidth estimates) and the per-expert weight transposition."""
    counts = routed_rows(tokens, cfg, dev)
    padded = (counts + 15) // 16 * 16
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    offs_pad = torch.cumsum(padded, 0, dtype=torch.int32)
    rows, rows_pad = int(counts.sum()), int(padded.sum())
    experts, hidden, ffn = cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size
    starts = offs - counts
    starts_pad = offs_pad - padded
    # padded position of every row
    row_ids = torch.arange(rows, device=dev)
    group = torch.repeat_interleave(torch.arange(experts, device=dev), counts, output_size=rows)
    dest = row_ids - starts[group] + starts_pad[group]
    result: dict = {"rows": rows, "rows_padded": rows_pad}
    torch.manual_seed(0)
    for name, m, n in (("down", hidden, ffn), ("up", ffn, hidden)):
        grad = torch.randn(rows, m, device=dev, dtype=torch.bfloat16)
        inp = torch.randn(rows, n, device=dev, dtype=torch.bfloat16).relu()
        bf16 = median(time_ms(lambda: torch._grouped_mm(grad.t(), inp, offs=offs), dev, warmup, iters))

        def transposed(x):
            xt = torch.zeros(x.shape[1], rows_pad, dtype=x.dtype, device=dev)
            xt[:, dest] = x.t()
            return xt

        g_q, _, g_inv = quantize_tensor(grad)
        i_q, _, i_inv = quantize_tensor(inp)
        gt_q, it_q = transposed(g_q), transposed(i_q)
        sa = g_inv.reshape(1).expand(experts * m).contiguous().float()
        sb = i_inv.reshape(1).expand(experts * n).contiguous().float()
        res = {"bf16_ms": bf16}
        for out_dtype in (torch.bfloat16, torch.float32):
            try:

                def fn(out_dtype=out_dtype):
                    return torch._scaled_grouped_mm(
                        gt_q, it_q.t(), sa, sb, offs=offs_pad, out_dtype=out_dtype
                    )

                res[f"fp8_{str(out_dtype)[6:]}_ms"] = median(time_ms(fn, dev, warmup, iters))
                ref = torch._grouped_mm(grad.t(), inp, offs=offs).float()
                res[f"fp8_{str(out_dtype)[6:]}_vs_bf16_rel"] = float((fn().float() - ref).norm() / ref.norm())
            except Exception as err:  # noqa: BLE001 - report and go on
                res[f"fp8_{str(out_dtype)[6:]}_error"] = str(err)[:300]
        # candidate quantization passes (compiled PyTorch, bandwidth estimates)
        scale = torch.tensor(1.0, device=dev)

        def from_bf16(x):
            xt = torch.zeros(x.shape[1], rows_pad, dtype=F8, device=dev)
            xt[:, dest] = (x.float() * scale).to(F8).t()
            return xt

        def from_fp8(xq):
            xt = torch.zeros(xq.shape[1], rows_pad, dtype=F8, device=dev)
            xt[:, dest] = (xq.float() * scale).to(F8).t()
            return xt

        for label, fn, arg in (
            ("transpose_from_bf16", from_bf16, grad),
            ("transpose_from_fp8", from_fp8, g_q),
        ):
            c = torch.compile(fn, fullgraph=True, dynamic=False)
            res[f"{label}_ms"] = median(time_ms(lambda: c(arg), dev, warmup, iters))
        result[name] = res
        print(f"expert wgrad {name}: {res}")
    # the weights' transposed form for the input gradient: per-column scales (the compiled
    # `quantize_rows` of the transposed weight, what `fp8_expert_mlp` ran before) against one
    # known scale per expert matrix (`quantize_transposed`, what it runs now)
    from nemotron.kernels.fp8 import quantize_transposed

    w = torch.randn(experts, ffn, hidden, device=dev, dtype=torch.bfloat16) * 0.02
    cols = torch.compile(lambda w: quantize_rows(w.transpose(-2, -1)), fullgraph=True, dynamic=False)
    inv = quantize_rows(w)[1].amax(-1)
    per_matrix = torch.compile(quantize_transposed, fullgraph=True, dynamic=False)
    result["weight_columns_ms"] = median(time_ms(lambda: cols(w), dev, warmup, iters))
    result["weight_transposed_per_matrix_ms"] = median(
        time_ms(lambda: per_matrix(w, inv), dev, warmup, iters)
    )
    print(
        f"expert weight transposed: per column {result['weight_columns_ms']:.3f} ms, "
        f"one scale per matrix {result['weight_transposed_per_matrix_ms']:.3f} ms"
    )
    return result


def fp8_wgrad_part(cfg: Nano3Config, tokens: int, dev, warmup: int, iters: int) -> dict:
    """The routed experts' weight gradients on FP8 operands made from the row-quantized ones
    (`kernels.fp8_wgrad`), against what `fp8_expert_mlp` runs now (BF16 `torch._grouped_mm`
    after the compiled squared-ReLU backward that writes BF16 h and dh_pre), per MoE layer and
    micro-batch at the proxy's rows: the transposed forms (Triton), the product (Triton,
    several tile shapes; and `torch._scaled_grouped_mm` on the same forms), the squared-ReLU
    backward writing per-row FP8 forms instead of BF16, and the whole of each way."""
    from nemotron.kernels import fp8_wgrad as fw
    from nemotron.kernels.fp8 import compiled, rowwise
    from nemotron.kernels.fp8 import relu2_backward_rows as _relu2_backward_rows
    from nemotron.kernels.fp8_triton import relu2_backward_rows_triton
    from nemotron.kernels.fp8_wgrad_triton import grouped_weight_grad_triton, transposed_groups_triton
    from nemotron.train.fp8_grouped import _relu2_backward_quantize

    counts = routed_rows(tokens, cfg, dev)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    rows = int(counts.sum())
    hidden, ffn = cfg.hidden_size, cfg.moe_ffn_hidden_size
    layout = fw.expert_rows(offs, rows)
    torch.manual_seed(0)
    x = torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16)
    grad_out = torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16) * 1e-3
    h_pre = torch.randn(rows, ffn, device=dev, dtype=torch.bfloat16)
    grad_h = torch.randn(rows, ffn, device=dev, dtype=torch.bfloat16) * 1e-3
    out: dict = {"rows": rows, "padded": layout.padded}
    t = lambda fn: median(time_ms(fn, dev, warmup, iters))  # noqa: E731
    old_relu = compiled("relu2_bwd", _relu2_backward_quantize, dev)
    new_relu = compiled("relu2_bwd_rows", _relu2_backward_rows, dev)
    out["relu2_bwd_bf16_ms"] = t(lambda: old_relu(h_pre, grad_h))
    out["relu2_bwd_rows_ms"] = t(lambda: new_relu(h_pre, grad_h))
    out["relu2_bwd_rows_triton_ms"] = t(lambda: relu2_backward_rows_triton(h_pre, grad_h))
    h, dh_pre, dh_q, dh_inv = old_relu(h_pre, grad_h)
    h_q, h_inv, dh_q2, dh_inv2 = relu2_backward_rows_triton(h_pre, grad_h)
    # the Triton pass against the eager reference (Inductor may skip the BF16 rounding of dh_pre)
    eager = _relu2_backward_rows(h_pre, grad_h)
    out["relu2_rows_triton_equal_eager"] = [
        bool(
            torch.equal(
                a_.view(torch.uint8) if a_.dtype != torch.float32 else a_,
                b_.view(torch.uint8) if b_.dtype != torch.float32 else b_,
            )
        )
        for a_, b_ in zip(eager, (h_q, h_inv, dh_q2, dh_inv2))
    ]
    x_q, x_inv = rowwise(x)
    g_q, g_inv = rowwise(grad_out)
    out["layout_ms"] = t(lambda: fw.expert_rows(offs, rows))
    products = {"down": (grad_out, h, g_q, g_inv, h_q, h_inv), "up": (dh_pre, x, dh_q, dh_inv, x_q, x_inv)}
    configs = [
        (128, 128, 128, 4, 3), (128, 128, 128, 4, 4), (128, 128, 128, 8, 3), (128, 128, 64, 4, 5),
        (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
    ]  # fmt: skip
    transpose_configs = [
        (64, 128, 4),
        (64, 256, 4),
        (64, 256, 8),
        (32, 256, 4),
        (128, 128, 4),
        (64, 512, 8),
        (32, 128, 4),
    ]
    best_total = 0.0
    for name, (a, b, a_q, a_inv, b_q, b_inv) in products.items():
        res: dict = {}
        res["bf16_ms"] = t(lambda: torch._grouped_mm(a.t(), b, offs=offs))
        ref = torch._grouped_mm(a.t(), b, offs=offs).float()
        ref_t = transposed_groups_triton(a_q, a_inv, layout)[0].view(torch.uint8)
        for which, q_, inv_ in (("a", a_q, a_inv), ("b", b_q, b_inv)):
            for tc in transpose_configs:
                key = f"transposed_{which}_%dx%d_w%d_ms" % tc
                res[key] = t(lambda: transposed_groups_triton(q_, inv_, layout, config=tc))
                if which == "a":
                    same = torch.equal(
                        transposed_groups_triton(q_, inv_, layout, config=tc)[0].view(torch.uint8), ref_t
                    )
                    res[key.replace("_ms", "_same")] = same
            res[f"transposed_{which}_ms"] = min(
                v for k, v in res.items() if k.startswith(f"transposed_{which}_") and k.endswith("_ms")
            )
        at, ae = transposed_groups_triton(a_q, a_inv, layout)
        bt, be = transposed_groups_triton(b_q, b_inv, layout)
        best = None
        for cfg_ in configs:
            key = "triton_%dx%dx%d_w%d_s%d" % cfg_
            try:
                res[key + "_ms"] = t(lambda: grouped_weight_grad_triton(at, ae, bt, be, layout, config=cfg_))
                got = grouped_weight_grad_triton(at, ae, bt, be, layout, config=cfg_).float()
                res[key + "_vs_bf16_rel"] = float((got - ref).norm() / ref.norm())
                if best is None or res[key + "_ms"] < res[best + "_ms"]:
                    best = key
            except Exception as err:  # noqa: BLE001 - report and go on
                res[key + "_error"] = str(err)[:300]
        res["best"] = best
        try:
            sa = ae.repeat_interleave(at.shape[0]).contiguous()
            sb = be.repeat_interleave(bt.shape[0]).contiguous()
            fn = lambda: torch._scaled_grouped_mm(
                at, bt.t(), sa, sb, offs=layout.offs_padded, out_dtype=torch.bfloat16
            )  # noqa: E731
            res["cutlass_ms"] = t(fn)
            res["cutlass_vs_bf16_rel"] = float((fn().float() - ref).norm() / ref.norm())
        except Exception as err:  # noqa: BLE001
            res["cutlass_error"] = str(err)[:300]
        if best:
            best_total += res["transposed_a_ms"] + res["transposed_b_ms"] + res[best + "_ms"]
        out[name] = res
        print(f"fp8 wgrad {name}: {res}")
    out["now_ms"] = out["relu2_bwd_bf16_ms"] + out["down"]["bf16_ms"] + out["up"]["bf16_ms"]
    out["fp8_ms"] = out["relu2_bwd_rows_triton_ms"] + out["layout_ms"] + best_total
    print(f"fp8 wgrad per layer and micro-batch: now {out['now_ms']:.3f} ms, fp8 {out['fp8_ms']:.3f} ms")
    return out


def grouped_autotune_part(cfg: Nano3Config, tokens: int, dev, warmup: int, iters: int) -> dict:
    """The routed experts' forward and input-gradient grouped products at the proxy's rows, eager
    (CUTLASS, what `torch._grouped_mm` / `torch._scaled_grouped_mm` run) against
    `torch.compile(mode="max-autotune-no-cudagraphs")` of the same call (Inductor may pick its
    Triton grouped-GEMM template), BF16 and FP8 (rowwise scales), each checked against eager."""
    import torch._inductor.config as inductor_config

    inductor_config.max_autotune_gemm_backends = "ATEN,TRITON"
    counts = routed_rows(tokens, cfg, dev)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    rows, experts = int(counts.sum()), cfg.num_experts
    hidden, ffn = cfg.hidden_size, cfg.moe_ffn_hidden_size
    torch.manual_seed(0)
    result: dict = {"rows": rows}
    for name, k, n in (("up_fwd", hidden, ffn), ("down_fwd", ffn, hidden)):
        a = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(experts, n, k, device=dev, dtype=torch.bfloat16) * 0.02  # [E, N, K]
        a_q, a_inv = quantize_rows(a)
        w_q, w_inv = quantize_rows(w)

        def bf16(a, w, offs):
            return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)

        def fp8(a_q, w_q, a_inv, w_inv, offs):
            return torch._scaled_grouped_mm(
                a_q, w_q.transpose(-2, -1), a_inv, w_inv, offs=offs, out_dtype=torch.bfloat16
            )

        res = {}
        for label, fn, args in (("bf16", bf16, (a, w, offs)), ("fp8", fp8, (a_q, w_q, a_inv, w_inv, offs))):
            eager_out = fn(*args)
            res[f"{label}_eager_ms"] = median(time_ms(lambda fn=fn, args=args: fn(*args), dev, warmup, iters))
            try:
                tuned = torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False)
                out = tuned(*args)
                res[f"{label}_autotuned_ms"] = median(
                    time_ms(lambda t=tuned, args=args: t(*args), dev, warmup, iters)
                )
                res[f"{label}_autotuned_vs_eager_rel"] = float(
                    (out.float() - eager_out.float()).norm() / eager_out.float().norm()
                )
            except Exception as err:  # noqa: BLE001 - report and go on
                res[f"{label}_autotuned_error"] = str(err)[:300]
        result[name] = res
        print(f"grouped autotune {name}: {res}")
    return result


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, use_tma[, persistent]) of `kernels.fp8_grouped_triton`
GROUPED_TRITON_CONFIGS = [
    (128, 128, 128, 4, 8, True),
    (128, 128, 128, 3, 8, True),
    (128, 256, 128, 3, 8, True),
    (256, 128, 128, 3, 8, True),
    (128, 128, 64, 5, 8, True),
    (64, 128, 128, 4, 4, True),
    (128, 64, 128, 4, 4, True),
    (128, 128, 128, 4, 8, False),
    (128, 128, 128, 4, 8, True, True),
    (128, 256, 128, 3, 8, True, True),
    (256, 128, 128, 3, 8, True, True),
    (128, 256, 64, 4, 8, True),
    (256, 128, 64, 4, 8, True),
    (128, 128, 128, 3, 8, True, True),
]


def best_grouped_tiles(result: dict, max_rel: float = 1e-2) -> dict | None:
    """The one `train.fp8.experts_grouped_tiles` value for training from a `grouped_triton_part`
    result: the configuration with the least time summed over the two shapes under uneven
    routing (each is also an input-gradient product's shape, so the step runs each twice), among
    those that ran at both, agree with CUTLASS (relative difference < `max_rel`) and pass the
    config key's check. {"tiles": [7 ints], "ms", "cutlass_ms"} or None."""
    from nemotron.train.fp8_config import grouped_tiles_problem

    up, down = result.get("up_uneven", {}), result.get("down_uneven", {})
    best = None
    for config in result.get("configs", []):
        tiles = [int(v) for v in config] + [0] * (7 - len(config))
        label = _grouped_label(config)
        parts = [up.get(label, {}), down.get(label, {})]
        if grouped_tiles_problem(tiles) or not all(
            "ms" in p and p["rel_vs_cutlass"] < max_rel for p in parts
        ):
            continue
        ms = parts[0]["ms"] + parts[1]["ms"]
        if best is None or ms < best["ms"]:
            best = {"tiles": tiles, "ms": ms, "cutlass_ms": up["cutlass_ms"] + down["cutlass_ms"]}
    return best


def _grouped_label(c) -> str:
    """A configuration's name in the results: "MxNxKxSTAGESxWARPS-tma|ptr[-persistent]"."""
    return (
        "x".join(str(v) for v in c[:5])
        + ("-tma" if c[5] else "-ptr")
        + ("-persistent" if c[6:] and c[6] else "")
    )


def grouped_triton_part(cfg: Nano3Config, tokens: int, dev, warmup: int, iters: int) -> dict:
    """The routed experts' forward / input-gradient grouped FP8 product at the proxy's rows:
    PyTorch's CUTLASS kernel (`torch._scaled_grouped_mm`, fast accumulation, what training
    runs) against `kernels.fp8_grouped_triton` at each of GROUPED_TRITON_CONFIGS, and one dense
    `torch._scaled_mm` over all the rows (the rate the same work reaches as one GEMM). The two
    shapes (up: K hidden, N ffn; down: K ffn, N hidden) are also the input gradients' (down's
    and up's); uneven routing (`routed_rows`) and balanced groups. Each Triton result checked
    against CUTLASS's (relative norm of the difference)."""
    from nemotron.kernels.fp8 import quantize_rows
    from nemotron.kernels.fp8_grouped_triton import grouped_mm_triton

    hidden, ffn, experts = cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.num_experts
    uneven = routed_rows(tokens, cfg, dev)
    rows = int(uneven.sum())
    balanced = torch.full((experts,), rows // experts, device=dev, dtype=torch.long)
    balanced[: rows - int(balanced.sum())] += 1
    torch.manual_seed(0)
    result: dict = {"rows": rows, "configs": [list(c) for c in GROUPED_TRITON_CONFIGS]}
    for name, k, n in (("up", hidden, ffn), ("down", ffn, hidden)):
        a_q, a_inv = quantize_rows(torch.randn(rows, k, device=dev, dtype=torch.bfloat16))
        w_q, w_inv = quantize_rows(torch.randn(experts, n, k, device=dev, dtype=torch.bfloat16) * 0.02)
        tflop = 2 * rows * n * k / 1e12
        one = torch.ones(rows, 1, device=dev), torch.ones(1, n, device=dev)
        dense = median(
            time_ms(
                lambda: torch._scaled_mm(
                    a_q, w_q[0].t(), one[0], one[1], out_dtype=torch.bfloat16, use_fast_accum=True
                ),
                dev,
                warmup,
                iters,
            )
        )
        for groups, counts in (("uneven", uneven), ("balanced", balanced)):
            offs = torch.cumsum(counts, 0, dtype=torch.int32)

            def cutlass(offs=offs):
                return torch._scaled_grouped_mm(
                    a_q, w_q.transpose(-2, -1), a_inv, w_inv, offs=offs, out_dtype=torch.bfloat16,
                    use_fast_accum=True,
                )  # fmt: skip

            ref = cutlass().float()
            res: dict = {"cutlass_ms": median(time_ms(cutlass, dev, warmup, iters)), "dense_ms": dense}
            for c in GROUPED_TRITON_CONFIGS:
                label = _grouped_label(c)
                try:
                    out = grouped_mm_triton(a_q, a_inv, w_q, w_inv, offs, config=c).float()
                    rel = float((out - ref).norm() / ref.norm())
                    ms = median(
                        time_ms(
                            lambda c=c, offs=offs: grouped_mm_triton(a_q, a_inv, w_q, w_inv, offs, config=c),
                            dev,
                            warmup,
                            iters,
                        )
                    )
                    res[label] = {"ms": ms, "tflops": tflop / ms * 1e3, "rel_vs_cutlass": rel}
                except Exception as err:  # noqa: BLE001 - a config that does not compile or fit
                    res[label] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            res["cutlass_tflops"] = tflop / res["cutlass_ms"] * 1e3
            res["dense_tflops"] = tflop / dense * 1e3
            best = min((v["ms"], lbl) for lbl, v in res.items() if isinstance(v, dict) and "ms" in v)
            print(
                f"grouped {name} {groups}: CUTLASS {res['cutlass_ms']:.3f} ms ({res['cutlass_tflops']:.0f} TFLOP/s), "
                f"dense {dense:.3f} ms ({res['dense_tflops']:.0f}); best Triton {best[1]} {best[0]:.3f} ms "
                f"({tflop / best[0] * 1e3:.0f}, rel {res[best[1]]['rel_vs_cutlass']:.1e})"
            )
            result[f"{name}_{groups}"] = res
    best = best_grouped_tiles(result)
    result["best"] = best
    if best is None:
        print("grouped best: no configuration ran at both shapes and agreed with CUTLASS")
    else:
        # the form train.fp8.experts_grouped_tiles / XT_TILES / --fp8-experts-tiles take
        print(
            f"grouped best (up + down, uneven routing): {best['ms']:.3f} ms against CUTLASS "
            f"{best['cutlass_ms']:.3f} ms\nGROUPED_TRITON_BEST_TILES={','.join(map(str, best['tiles']))}"
        )
    return result


def fast_accum_part(cfg: Nano3Config, tokens: int, lm_chunk: int, dev, warmup: int, iters: int) -> dict:
    """FP8 products with and without `use_fast_accum` (Hopper's FP8 tensor cores accumulate
    the whole contraction in their own reduced-precision accumulator instead of the GEMM adding
    partial sums into float32 registers every few k-blocks): time and each result's error
    against the float32 product of the same float8 operands, per shape. Dense: every proxy GEMM
    (tensorwise, cuBLAS); grouped: the routed experts' two shapes (rowwise, CUTLASS; forward
    and input gradient have the same two)."""
    from nemotron.train.fp8_grouped import _scaled_grouped_mm as scaled_grouped_mm

    torch.manual_seed(0)
    result: dict = {"dense": [], "grouped": {}}

    def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
        return float((out.float() - ref).norm() / ref.norm())

    for kind, m, n, k, calls in proxy_gemms(cfg, tokens, lm_chunk):
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16).to(F8)
        b = torch.randn(n, k, device=dev, dtype=torch.bfloat16).to(F8)
        one = torch.ones((), device=dev)
        ref = a.float() @ b.float().t()
        row = {"kind": kind, "m": m, "n": n, "k": k, "calls": calls}
        for fast in (False, True):
            out = torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=fast)
            tag = "fast" if fast else "exact"
            row[f"{tag}_rel_err"] = rel(out, ref)
            row[f"{tag}_ms"] = median(
                time_ms(
                    lambda fast=fast: torch._scaled_mm(
                        a, b.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=fast
                    ),
                    dev,
                    warmup,
                    iters,
                )
            )
        del ref
        result["dense"].append(row)
        print(
            f"fast accum {kind:14s} {m:6d}x{n:6d}x{k:6d}: {row['exact_ms']:.3f} -> {row['fast_ms']:.3f} ms, "
            f"rel err {row['exact_rel_err']:.2e} -> {row['fast_rel_err']:.2e}"
        )
    counts = routed_rows(tokens, cfg, dev)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    rows, experts = int(counts.sum()), cfg.num_experts
    for name, k, n in (
        ("up_fwd_and_grad_h", cfg.hidden_size, cfg.moe_ffn_hidden_size),
        ("down_fwd_and_grad_x", cfg.moe_ffn_hidden_size, cfg.hidden_size),
    ):
        a_q, a_inv = quantize_rows(torch.randn(rows, k, device=dev, dtype=torch.bfloat16))
        w_q, w_inv = quantize_rows(torch.randn(experts, n, k, device=dev, dtype=torch.bfloat16) * 0.02)
        res: dict = {"rows": rows, "n": n, "k": k}
        first = int(counts[1])  # a large group: the error check reads one expert's rows
        start = int(offs[0])
        ref = (a_q[start : start + first].float() * a_inv[start : start + first, None]) @ (
            w_q[1].float() * w_inv[1][:, None]
        ).t()
        for fast in (False, True):

            def fn(fast=fast):  # the routed experts' own call
                return scaled_grouped_mm(a_q, a_inv, w_q, w_inv, offs, fast)

            tag = "fast" if fast else "exact"
            res[f"{tag}_rel_err"] = rel(fn()[start : start + first], ref)
            res[f"{tag}_ms"] = median(time_ms(fn, dev, warmup, iters))
        result["grouped"][name] = res
        print(f"fast accum grouped {name}: {res}")
    return result


def quant_part(dev, warmup: int, iters: int) -> dict:
    out = {}
    # routed rows x hidden / x expert ffn (relu2), expert weights, LM head weight and hidden
    for rows, cols, relu2 in (
        (147456, 2688, False),
        (147456, 1856, True),
        (64 * 1856, 2688, False),
        (131072, 2688, False),
        (24576, 2688, False),
    ):
        x = torch.randn(rows, cols, device=dev, dtype=torch.bfloat16)
        reference = torch.compile(relu2_rows if relu2 else quantize_rows, fullgraph=True, dynamic=False)
        gbytes = rows * cols * 3 / 1e9  # read bf16, write fp8
        row = {}
        for name, fn in (("compiled_reference", reference), ("triton", lambda x: rowwise(x, relu2=relu2))):
            ms = median(time_ms(lambda: fn(x), dev, warmup, iters))
            row[f"{name}_ms"] = ms
            row[f"{name}_GB_per_s"] = gbytes / ms * 1e3
        (q, inv), (rq, rinv) = rowwise(x, relu2=relu2), reference(x)
        row["bitwise_equal"] = bool(
            torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(inv, rinv)
        )
        out[f"{rows}x{cols}{'_relu2' if relu2 else ''}"] = row
        print(
            f"quantize {rows}x{cols}{' relu2' if relu2 else ''}: compiled {row['compiled_reference_ms']:.3f} ms "
            f"({row['compiled_reference_GB_per_s']:.0f} GB/s), triton {row['triton_ms']:.3f} ms "
            f"({row['triton_GB_per_s']:.0f} GB/s), bitwise equal {row['bitwise_equal']}"
        )
    return out


def lm_head_part(cfg: Nano3Config, tokens: int, chunk: int, dev, warmup: int, iters: int) -> dict:
    from nemotron.kernels.cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(tokens, cfg.hidden_size, device=dev, dtype=torch.bfloat16)
    weight = torch.randn(cfg.vocab_size, cfg.hidden_size, device=dev, dtype=torch.bfloat16) * 0.02
    labels = torch.randint(0, cfg.vocab_size, (tokens,), device=dev)

    def run(fp8: bool):
        def step():
            h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            loss = linear_cross_entropy(h, w, labels, chunk_size=chunk, fp8=fp8)
            loss.backward()
            return loss.detach(), h.grad, w.grad

        return step

    result: dict = {"rows": tokens, "vocab": cfg.vocab_size, "chunk": chunk}
    outs = {}
    for name, fp8 in (("bf16", False), ("fp8", True)):
        step = run(fp8)
        result[f"{name}_fwd_bwd_ms"] = ms = median(time_ms(step, dev, warmup, iters))
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        outs[name] = [t.double() for t in step()]
        result[f"{name}_peak_extra_gib"] = peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
        print(f"lm_head {name}: {ms:.2f} ms fwd+bwd, peak +{peak:.2f} GiB")
    # float64 truth on a slice of rows (all rows in float64 would not fit): loss, dh per row,
    # dW of that slice's loss
    rows = min(tokens, 2048)
    h64 = hidden[:rows].double().requires_grad_()
    w64 = weight.double().requires_grad_()
    linear_cross_entropy(h64, w64, labels[:rows], chunk_size=512).backward()

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    result["fp8_vs_bf16_rel"] = {
        k: rel(outs["fp8"][i], outs["bf16"][i]) for i, k in enumerate(("loss", "grad_hidden", "grad_weight"))
    }
    # the slice's gradients scale with 1/tokens in the full run: compare the hidden rows only
    scale = rows / tokens
    result["grad_hidden_rows_vs_float64_rel"] = {
        name: rel(outs[name][1][:rows] / scale, h64.grad) for name in outs
    }
    print(f"lm_head: {json.dumps({k: v for k, v in result.items() if 'rel' in k})}")
    result["grad_fp8_tiles"] = grad_fp8_tile_sweep(cfg, chunk, dev, warmup, iters)
    return result


def grad_fp8_tile_sweep(
    cfg: Nano3Config, chunk: int, dev, warmup: int, iters: int, group: int = 24576
) -> dict:
    """The FP8 logit-gradient kernel (one [chunk, V] chunk: reads the BF16 logits, writes e4m3
    rows and transposed e5m2) per tile shape: ms and GB/s (4 bytes per element moved), with the
    transposed output a [V, chunk] matrix ("alone") and, as training writes it, a column slice
    of a [V, group] one at the third chunk ("training"); "tuned": the tile `logit_grad_fp8`
    picks itself (`GRAD_FP8_TILES`)."""
    from nemotron.kernels.cross_entropy_triton import GRAD_FP8_TILE, GRAD_FP8_TILES, logit_grad_fp8

    v = cfg.vocab_size
    logits = (torch.randn(chunk, v, device=dev) * 2.0).bfloat16()
    labels = torch.randint(0, v, (chunk,), device=dev)
    lse = torch.logsumexp(logits.float(), dim=-1)
    row_scale = torch.full((chunk,), 1.0 / 24576, device=dev)
    sr, sc = torch.tensor(2.0**22, device=dev), torch.tensor(2.0**29, device=dev)
    gq = torch.empty(chunk, v, dtype=torch.float8_e4m3fn, device=dev)
    layouts = {
        "alone": torch.empty(v, chunk, dtype=torch.float8_e5m2, device=dev),
        "training": torch.empty(v, max(group, 3 * chunk), dtype=torch.float8_e5m2, device=dev)[
            :, 2 * chunk :
        ],
    }
    out: dict = {"default": list(GRAD_FP8_TILE)}
    for layout, gqt in layouts.items():
        rows = out.setdefault(layout, {})
        for tile in (*GRAD_FP8_TILES, None):
            name = "tuned" if tile is None else "x".join(map(str, tile))
            try:
                ms = median(
                    time_ms(
                        lambda: logit_grad_fp8(logits, lse, labels, row_scale, sr, sc, gq, gqt, tile=tile),
                        dev,
                        warmup,
                        iters,
                    )
                )
            except Exception as err:  # noqa: BLE001 - a tile the compiler refuses: report, go on
                rows[name] = {"error": str(err)[:300]}
                print(f"logit_grad_fp8 {layout} tile {name}: {err}")
                continue
            rows[name] = {"ms": ms, "GB_per_s": chunk * v * 4 / ms / 1e6}
            print(f"logit_grad_fp8 {layout} tile {name}: {ms:.3f} ms ({chunk * v * 4 / ms / 1e6:.0f} GB/s)")
    return out


def rows_config_sweep(cfg: Nano3Config, chunk: int, dev, warmup: int, iters: int) -> dict:
    """The LM-head loss's row kernel (one [chunk, V] chunk, loss and log-sum-exp only: one read
    of the BF16 logits) per (columns per iteration, warps): ms and GB/s (2 bytes per element)."""
    from nemotron.kernels.cross_entropy_triton import ROWS_CONFIG, cross_entropy_rows

    v = cfg.vocab_size
    logits = (torch.randn(chunk, v, device=dev) * 2.0).bfloat16()
    labels = torch.randint(0, v, (chunk,), device=dev)
    out: dict = {"default": list(ROWS_CONFIG)}
    for config in ((4096, 8), (4096, 16), (8192, 8), (8192, 16), (2048, 8), (2048, 4), (16384, 16)):
        name = "x".join(map(str, config))
        ms = median(
            time_ms(lambda: cross_entropy_rows(logits, labels, None, config=config), dev, warmup, iters)
        )
        out[name] = {"ms": ms, "GB_per_s": chunk * v * 2 / ms / 1e6}
        print(f"cross_entropy_rows {name}: {ms:.3f} ms ({chunk * v * 2 / ms / 1e6:.0f} GB/s)")
    return out


def dense_linear_shapes(cfg: Nano3Config) -> list[tuple[str, int, int]]:
    """(kind, in_features, out_features) of each distinct dense linear of the proxy."""
    h = cfg.hidden_size
    d_inner = cfg.mamba_num_heads * cfg.mamba_head_dim
    in_proj = 2 * d_inner + 2 * cfg.mamba_num_groups * cfg.mamba_state_size + cfg.mamba_num_heads
    q = cfg.num_attention_heads * cfg.head_dim
    ffn = cfg.moe_shared_expert_hidden_size
    return [
        ("mamba in_proj", h, in_proj),
        ("mamba out_proj / attention o_proj", d_inner, h),
        ("attention q_proj", h, q),
        ("shared_expert up_proj", h, ffn),
        ("shared_expert down_proj", ffn, h),
    ]


def linears_part(cfg: Nano3Config, seq: int, micro_batch: int, dev, warmup: int, iters: int) -> list[dict]:
    """Forward + backward of each dense linear at one micro-batch's tokens, BF16 against the
    FP8 linear training uses (`train.fp8` defaults: tensorwise, fast accumulation, compiled),
    with the top kernels of one profiled call of each. The calls accumulate into the input's and
    the weight's `.grad`, as gradient accumulation does: the same two BF16 adds in both modes."""
    from torch import nn
    from torch.profiler import ProfilerActivity, profile
    from torchao.float8 import convert_to_float8_training

    from nemotron.train.fp8 import Fp8Config, float8_linear_config

    config = float8_linear_config(Fp8Config(enabled=True), emulate=False)
    rows = []
    for kind, k, n in dense_linear_shapes(cfg):
        row: dict = {"kind": kind, "in": k, "out": n}
        for mode in ("bf16", "fp8"):
            model = nn.Sequential(nn.Linear(k, n, bias=False)).to(dev, torch.bfloat16)
            if mode == "fp8":
                convert_to_float8_training(model, config=config)
                model[0].compile(dynamic=False)
            x = torch.randn(micro_batch, seq, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn(micro_batch, seq, n, device=dev, dtype=torch.bfloat16)

            def step() -> None:
                model(x).backward(dy)

            row[f"{mode}_ms"] = median(time_ms(step, dev, warmup, iters))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize(dev)
            kernels = [
                {"name": e.key[:100], "ms": e.self_device_time_total / 1e3, "calls": e.count}
                for e in prof.key_averages()
                if e.self_device_time_total > 0
            ]
            row[f"{mode}_kernels"] = sorted(kernels, key=lambda r: -r["ms"])[:12]
        row["bf16_over_fp8"] = row["bf16_ms"] / row["fp8_ms"]
        print(
            f"{kind:34s} {k:5d}->{n:5d}: bf16 {row['bf16_ms']:.3f} fp8 {row['fp8_ms']:.3f} ms ({row['bf16_over_fp8']:.2f}x)"
        )
        rows.append(row)
    return rows


def gathered_forms_part(cfg: Nano3Config, tokens: int, dev, warmup: int, iters: int) -> dict:
    from nemotron.kernels.fp8 import compiled, quantize_transposed
    from nemotron.train.fp8_gather import pack_forms, unpack_forms

    e, n, k = cfg.num_experts, cfg.moe_ffn_hidden_size, cfg.hidden_size
    gen = torch.Generator(device=dev).manual_seed(0)
    master = torch.randn(e, n, k, device=dev, generator=gen) * 0.02
    w = master.to(torch.bfloat16)
    transposed = compiled("transposed", quantize_transposed, w.device)
    rows_q, rows_inv = rowwise(w)
    t_q, t_inv = transposed(w, rows_inv.amax(-1))
    g_rows_q, g_rows_inv, g_t_q, g_t_inv = unpack_forms(pack_forms(w, 1), n, k)
    out: dict = {
        "pack_forms_ms": median(time_ms(lambda: pack_forms(w, 1), dev, warmup, iters)),
        "rowwise_ms": median(time_ms(lambda: rowwise(w), dev, warmup, iters)),
        "transposed_ms": median(time_ms(lambda: transposed(w, rows_inv.amax(-1)), dev, warmup, iters)),
        "master_to_bf16_ms": median(time_ms(lambda: master.to(torch.bfloat16), dev, warmup, iters)),
    }
    counts = routed_rows(tokens, cfg, dev)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    rows = int(counts.sum())
    x_q, x_inv = rowwise(torch.randn(rows, k, device=dev, generator=gen).to(torch.bfloat16))
    g_q, g_inv = rowwise(torch.randn(rows, n, device=dev, generator=gen).to(torch.bfloat16))

    def mm(a_q, a_inv, b_q, b_inv):
        return lambda: torch._scaled_grouped_mm(
            a_q, b_q.transpose(-2, -1), a_inv, b_inv, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=True
        )

    variants = {
        "forward_own": mm(x_q, x_inv, rows_q, rows_inv),
        "forward_gathered": mm(x_q, x_inv, g_rows_q, g_rows_inv),
        "forward_gathered_values": mm(x_q, x_inv, g_rows_q, rows_inv),
        "forward_gathered_scales": mm(x_q, x_inv, rows_q, g_rows_inv),
        "input_grad_own": mm(g_q, g_inv, t_q, t_inv),
        "input_grad_gathered": mm(g_q, g_inv, g_t_q, g_t_inv),
    }
    assert torch.equal(variants["forward_own"](), variants["forward_gathered"]())
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(3):  # alternately, so that clock drift does not favour one
        for name, fn in variants.items():
            times[name] += time_ms(fn, dev, warmup, iters)
    out.update({f"{name}_ms": median(t) for name, t in times.items()})
    print("gathered forms: " + ", ".join(f"{key} {v:.3f}" for key, v in out.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=3)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--lm-chunk", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--parts", default="gemms,experts,quant")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = Nano3Config(num_experts=args.experts)
    tokens = args.seq * args.micro_batch
    result: dict = {"env": environment(dev), "command": " ".join(sys.argv), "tokens_per_micro_batch": tokens}
    parts = args.parts.split(",")
    if "gemms" in parts:
        rows = []
        totals: dict[str, dict[str, float]] = {}
        for kind, m, n, k, calls in proxy_gemms(cfg, tokens, args.lm_chunk):
            t = time_gemm(m, n, k, dev, args.warmup, args.iters)
            rows.append({"kind": kind, "m": m, "n": n, "k": k, "calls": calls, **t})
            tot = totals.setdefault(kind, {"bf16_ms": 0.0, "fp8_tensorwise_ms": 0.0, "fp8_rowwise_ms": 0.0})
            for key in tot:
                tot[key] += t[key] * calls
            print(
                f"{kind:14s} {m:6d}x{n:6d}x{k:6d} x{calls}: bf16 {t['bf16_ms']:.3f} "
                f"fp8 tensorwise {t['fp8_tensorwise_ms']:.3f} rowwise {t['fp8_rowwise_ms']:.3f} ms"
            )
        result["gemms"] = rows
        result["per_micro_batch_ms"] = totals
        for kind, tot in totals.items():
            print(f"per micro-batch {kind}: " + ", ".join(f"{k} {v:.2f}" for k, v in tot.items()))
    if "experts" in parts:
        result["experts"] = expert_mlp_part(cfg, tokens, dev, args.warmup, args.iters)
    if "expert_wgrad" in parts:
        result["expert_wgrad"] = expert_wgrad_part(cfg, tokens, dev, args.warmup, args.iters)
    if "fp8_wgrad" in parts:
        result["fp8_wgrad"] = fp8_wgrad_part(cfg, tokens, dev, args.warmup, args.iters)
    if "grouped_autotune" in parts:
        result["grouped_autotune"] = grouped_autotune_part(cfg, tokens, dev, args.warmup, args.iters)
    if "grouped_triton" in parts:
        result["grouped_triton"] = grouped_triton_part(cfg, tokens, dev, args.warmup, args.iters)
    if "fast_accum" in parts:
        result["fast_accum"] = fast_accum_part(cfg, tokens, args.lm_chunk, dev, args.warmup, args.iters)
    if "quant" in parts:
        result["quant"] = quant_part(dev, args.warmup, args.iters)
    if "lm_head" in parts:
        result["lm_head"] = lm_head_part(cfg, tokens, args.lm_chunk, dev, args.warmup, args.iters)
    if "lm_head_kernels" in parts:
        result["grad_fp8_tiles"] = grad_fp8_tile_sweep(cfg, args.lm_chunk, dev, args.warmup, args.iters)
        result["rows_configs"] = rows_config_sweep(cfg, args.lm_chunk, dev, args.warmup, args.iters)
    if "gathered_forms" in parts:
        result["gathered_forms"] = gathered_forms_part(cfg, tokens, dev, args.warmup, args.iters)
    if "linears" in parts:
        result["linears"] = linears_part(cfg, args.seq, args.micro_batch, dev, args.warmup, args.iters)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "gemms"}, indent=1))
    best = result.get("grouped_triton", {}).get("best")
    if best:  # last, for a script: the value train.fp8.experts_grouped_tiles takes
        print(f"GROUPED_TRITON_BEST_TILES={','.join(map(str, best['tiles']))}")


if __name__ == "__main__":
    main()
