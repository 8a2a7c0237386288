"""Fast paths == references on a CUDA device, at bf16 tolerance (skipped without a GPU).

Errors are ||out - ref|| / ||ref|| against a float64 reference on the same (bf16-rounded) inputs.
The bounds are those measured at the full Nano3 shape (docs/kernels.md) with some headroom.
"""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def rel(a, b):
    a, b = a.double(), b.double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def test_ssd_triton_matches_reference_bf16():
    pytest.importorskip("triton")
    from nemotron.kernels.ssd import ssd, ssd_chunked_reference

    b, l, h, p, g, n = 2, 1000, 8, 64, 2, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, l, h, p, device="cuda", generator=gen).bfloat16()
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, device="cuda", generator=gen) * 0.5 - 4.0)
    A = -torch.empty(h, device="cuda").uniform_(1.0, 16.0, generator=gen)
    B = torch.randn(b, l, g, n, device="cuda", generator=gen).bfloat16()
    C = torch.randn(b, l, g, n, device="cuda", generator=gen).bfloat16()
    s0 = torch.randn(b, h, p, n, device="cuda", generator=gen)
    gy = torch.randn(b, l, h, p, device="cuda", generator=gen)
    gs = torch.randn(b, h, p, n, device="cuda", generator=gen)

    def run(fn, cast):
        # float64 run: every input upcast; bf16 run: inputs as given (x/B/C bf16, dt/A/state fp32)
        leaves = [
            (t.double() if cast == torch.float64 else t).detach().requires_grad_(True)
            for t in (x, dt, A, B, C, s0)
        ]
        y, s = fn(*leaves[:5], 128, leaves[5])
        torch.autograd.backward([y, s], [gy.to(y.dtype), gs.to(s.dtype)])
        return [y, s] + [t.grad for t in leaves]

    got = run(ssd, torch.bfloat16)
    want = run(ssd_chunked_reference, torch.float64)
    names = ["y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dinitial_state"]
    errs = {k: rel(a, w) for k, a, w in zip(names, got, want)}
    assert max(v for k, v in errs.items() if k != "dA") < 1e-2, errs
    assert errs["dA"] < 4e-2, errs


def test_gated_rmsnorm_triton_matches_reference_bf16():
    pytest.importorskip("triton")
    from nemotron.kernels.rmsnorm import gated_rmsnorm, gated_rmsnorm_reference

    y = torch.randn(3, 333, 1024, device="cuda", dtype=torch.bfloat16)
    z = torch.randn_like(y)
    w = (1 + 0.1 * torch.randn(1024, device="cuda")).bfloat16()
    gout = torch.randn_like(y)

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_(True) for t in (y, z, w)]
        out = fn(*leaves, 128)
        out.backward(gout.to(cast))
        return [out] + [t.grad for t in leaves]

    for a, b in zip(run(gated_rmsnorm, torch.bfloat16), run(gated_rmsnorm_reference, torch.float64)):
        assert rel(a, b) < 1e-2


def test_linear_cross_entropy_triton_matches_full_logits():
    pytest.importorskip("triton")
    from nemotron.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

    n, h, v = 1500, 256, 5000
    hidden = torch.randn(n, h, device="cuda").bfloat16()
    weight = (torch.randn(v, h, device="cuda") * 0.05).bfloat16()
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::7] = -100
    mask = (torch.rand(n, device="cuda") > 0.2).float()

    def run(fn, **kw):
        hh, ww = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fn(hh, ww, labels, mask, **kw)
        loss.backward()
        return [loss, hh.grad, ww.grad]

    want = run(linear_cross_entropy_reference)
    for kw in ({}, {"grad_in_forward": False}, {"chunk_size": 256}):
        for a, b in zip(run(linear_cross_entropy, **kw), want):
            assert rel(a, b) < 1e-2, kw


def test_causal_conv1d_triton_matches_reference_bf16():
    pytest.importorskip("triton")
    from nemotron.kernels.conv1d import causal_conv1d, causal_conv1d_reference

    gen = torch.Generator(device="cuda").manual_seed(3)
    wide = torch.randn(2, 1000, 6144 + 64, device="cuda", generator=gen).bfloat16()
    x = wide[..., 32 : 32 + 6144]  # a strided slice, as the mixer passes it
    w = torch.randn(6144, 1, 4, device="cuda", generator=gen) * 0.5
    bias = torch.randn(6144, device="cuda", generator=gen)
    gy = torch.randn(2, 1000, 6144, device="cuda", generator=gen).bfloat16()

    def run(fn, dtype):
        leaves = [t.to(dtype).detach().requires_grad_(True) for t in (x, w, bias)]
        y = fn(*leaves, "silu")
        y.backward(gy.to(y.dtype))
        return [y] + [t.grad for t in leaves]

    got = run(causal_conv1d, torch.bfloat16)
    want = run(causal_conv1d_reference, torch.float64)
    errs = [rel(a, b) for a, b in zip(got, want)]
    assert max(errs) < 1e-2, errs


def test_moe_weighted_combine_triton_matches_reference():
    pytest.importorskip("triton")
    from nemotron.kernels.moe_combine import weighted_combine, weighted_combine_reference

    tokens, k, hidden = 4096, 6, 2688
    gen = torch.Generator(device="cuda").manual_seed(4)
    experts = torch.randint(0, 128, (tokens * k,), device="cuda", generator=gen)
    order = torch.argsort(experts, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device="cuda")
    rows = torch.randn(tokens * k, hidden, device="cuda", generator=gen).bfloat16()
    w = torch.rand(tokens, k, device="cuda", generator=gen)
    gy = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()

    def run(fn, dtype):
        r = rows.detach().clone().to(dtype).requires_grad_(True)
        ww = w.detach().clone().to(torch.float64 if dtype == torch.float64 else w.dtype).requires_grad_(True)
        y = fn(r, order, position, ww)
        y.backward(gy.to(y.dtype))
        return [y, r.grad, ww.grad]

    got = run(weighted_combine, torch.bfloat16)
    want = run(weighted_combine_reference, torch.float64)
    errs = [rel(a, b) for a, b in zip(got, want)]
    assert max(errs) < 1e-2, errs


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_router_fp32_linear_on_bf16_tensor_cores_is_float32_accurate(weight_dtype):
    """The emulated router GEMMs against float64, beside true float32 GEMMs (cuBLAS SGEMM) and
    plain bf16 GEMMs; the errors are printed (pytest -s) for docs/kernels.md."""
    from nemotron.kernels.fp32_linear import fp32_linear, fp32_linear_reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 2688, device="cuda", generator=gen).bfloat16().requires_grad_(True)
    w = (torch.randn(128, 2688, device="cuda", generator=gen) * 0.0173).to(weight_dtype).requires_grad_(True)
    g = torch.randn(4096, 128, device="cuda", generator=gen)

    def run(fn, xx, ww, gg):
        out = fn(xx, ww)
        return (out, *torch.autograd.grad(out, (xx, ww), gg.to(out.dtype)))

    emulated = run(fp32_linear, x, w, g)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    exact = run(lambda a, b: a @ b.t(), x64, w64, g.double())
    sgemm = run(fp32_linear_reference, x, w, g)
    bf16 = run(lambda a, b: (a @ b.bfloat16().t()).float(), x, w, g)
    names = ("logits", "grad x", "grad w")
    errors = {
        n: (rel(e, r), rel(s, r), rel(b, r)) for n, e, s, b, r in zip(names, emulated, sgemm, bf16, exact)
    }
    print(f"router GEMMs, weight {weight_dtype}: relative error vs float64 (emulated, SGEMM, bf16): {errors}")
    # logits (and the weight gradient of float32 weights) are float32 on every path: near SGEMM,
    # far below bf16; gradients of bf16 tensors are rounded to bf16 on every path
    for name in ("logits", "grad w") if weight_dtype == torch.float32 else ("logits",):
        e, s_err, b_err = errors[name]
        assert e < max(10 * s_err, 1e-5) and e < b_err / 50, (name, errors)
    assert errors["grad x"][0] < 8e-3, errors


def _mixer_grads(mixer, u, gy, *, fused, autocast):
    """Output and gradients (input and every parameter) of one mixer forward+backward; `fused`
    forces the fused chain on or off (off: the step-by-step fast path or, for float64, the reference)."""
    import nemotron.kernels.mamba_chain as chain

    mixer.zero_grad(set_to_none=True)
    uu = u.detach().clone().requires_grad_(True)
    with chain.fused_chain(fused), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = mixer(uu)
    nodes, frontier = [], [out.grad_fn]
    for _ in range(6):  # the autograd nodes within 6 steps of the output
        frontier = [n for f in frontier for n, _ in f.next_functions if n is not None]
        nodes += frontier
    fused_ran = any("MambaChainFunction" in type(n).__name__ for n in nodes)
    assert fused_ran == fused, f"fused chain ran: {fused_ran}, asked: {fused}"
    out.backward(gy.to(out.dtype))
    return {"out": out, "du": uu.grad, **{n: p.grad for n, p in mixer.named_parameters()}}


def test_mamba_chain_matches_reference_bf16():
    """The fused chain (bf16 parameters, autocast) against the float64 reference mixer, no worse
    than the step-by-step fast path it replaces."""
    pytest.importorskip("triton")
    import copy

    from nemotron.models.nano3 import Mamba2Mixer, Nano3Config

    cfg = Nano3Config(
        hybrid_pattern="M",
        num_layers=1,
        hidden_size=512,
        vocab_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        mamba_num_heads=16,
        mamba_head_dim=64,
        mamba_state_size=128,
        mamba_num_groups=2,
        mamba_chunk_size=128,
        num_experts=2,
        moe_top_k=1,
        moe_ffn_hidden_size=64,
        moe_shared_expert_hidden_size=64,
        ffn_hidden_size=64,
    )
    torch.manual_seed(0)
    ref = Mamba2Mixer(cfg).cuda()
    with torch.no_grad():
        ref.D.uniform_(0.5, 1.5)
        ref.norm.weight.uniform_(0.5, 1.5)
    fast = copy.deepcopy(ref).bfloat16()
    ref = ref.double()
    gen = torch.Generator(device="cuda").manual_seed(1)
    u = torch.randn(2, 1000, 512, device="cuda", generator=gen).bfloat16()
    gy = torch.randn(2, 1000, 512, device="cuda", generator=gen).bfloat16()

    want = _mixer_grads(ref, u.double(), gy.double(), fused=False, autocast=False)
    fused = _mixer_grads(fast, u, gy, fused=True, autocast=True)
    unfused = _mixer_grads(fast, u, gy, fused=False, autocast=True)
    errs = {k: (rel(fused[k], want[k]), rel(unfused[k], want[k])) for k in want}
    for name, (e_fused, e_unfused) in errs.items():
        assert e_fused <= max(1.5 * e_unfused, 5e-3), (name, errs)
    assert max(e for k, (e, _) in errs.items() if k not in ("A_log", "dt_bias")) < 2e-2, errs


def test_relu2_triton_bitwise_equal_to_reference_bf16():
    pytest.importorskip("triton")
    from nemotron.kernels.relu2 import _use_triton, relu2, relu2_reference

    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(4096 * 6 + 13, 1856, device="cuda", generator=gen).bfloat16()  # ragged tail
    x.view(-1)[:2] = torch.tensor([float("nan"), 0.0])
    gy = torch.randn(x.shape, device="cuda", generator=gen).bfloat16()
    assert _use_triton(x)

    def run(fn):
        leaf = x.clone().requires_grad_(True)
        y = fn(leaf)
        y.backward(gy)
        return [y, leaf.grad]

    # each element is one fp32 product rounded to bf16 on both paths
    for got, want in zip(run(relu2), run(relu2_reference)):
        assert torch.equal(got.nan_to_num(1.0), want.nan_to_num(1.0))
        assert got.view(-1)[0].isnan()


def test_relu2_triton_indexes_past_2_pow_31_elements():
    pytest.importorskip("triton")
    from nemotron.kernels.relu2 import relu2_reference, relu2_triton

    n = 2**31 + 4099  # int32 offsets would wrap in the last programs
    if torch.cuda.get_device_properties(0).total_memory < 5 * 2 * n:
        pytest.skip("needs ~22 GB of GPU memory")
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    y = relu2_triton(x)
    tail = slice(n - 10000, n)
    assert torch.equal(y[tail], relu2_reference(x.detach()[tail]))
    gy = torch.randn_like(y)
    y.backward(gy)
    xt = x.detach()[tail].clone().requires_grad_(True)
    relu2_reference(xt).backward(gy[tail])
    assert torch.equal(x.grad[tail], xt.grad)


def test_add_n_triton_bitwise_equal_to_reference():
    pytest.importorskip("triton")
    from nemotron.kernels.add_n import _use_triton, add_n, add_n_reference

    gen = torch.Generator(device="cuda").manual_seed(6)
    shape = (8192 + 3, 2688)
    ins = [
        torch.randn(shape, device="cuda", generator=gen),  # the router's fp32 gradient
        torch.randn(shape, device="cuda", generator=gen).bfloat16(),
        torch.randn(shape, device="cuda", generator=gen).bfloat16(),
    ]
    assert _use_triton(ins)
    for n in (2, 3):
        assert torch.equal(add_n(ins[:n], torch.bfloat16), add_n_reference(ins[:n], torch.bfloat16))


def test_moe_weighted_combine_with_add_matches_reference():
    pytest.importorskip("triton")
    from nemotron.kernels.moe_combine import weighted_combine, weighted_combine_reference

    tokens, k, hidden = 2048, 6, 2688
    gen = torch.Generator(device="cuda").manual_seed(7)
    order = torch.argsort(torch.randint(0, 128, (tokens * k,), device="cuda", generator=gen), stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device="cuda")
    rows = torch.randn(tokens * k, hidden, device="cuda", generator=gen).bfloat16()
    add = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
    w = torch.rand(tokens, k, device="cuda", generator=gen)
    gy = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()

    def run(fn, dtype):
        # detach(): fresh leaves each run (`.to` of a same-dtype tensor returns the tensor itself)
        r, a = rows.detach().to(dtype).requires_grad_(True), add.detach().to(dtype).requires_grad_(True)
        ww = w.detach().to(torch.float64 if dtype == torch.float64 else w.dtype).requires_grad_(True)
        y = fn(r, order, position, ww, a)
        y.backward(gy.to(y.dtype))
        return [y, r.grad, ww.grad, a.grad]

    errs = [
        rel(a, b)
        for a, b in zip(run(weighted_combine, torch.bfloat16), run(weighted_combine_reference, torch.float64))
    ]
    assert max(errs) < 1e-2, errs


def test_route_topk_triton_matches_reference_at_nano3_width():
    """Fused routing on 8192 tokens x 128 experts, top-6, with a balancing bias: the same experts
    in the same order as torch.topk, scores/weights/logit gradients at fp32 accuracy."""
    pytest.importorskip("triton")
    from nemotron.kernels.moe_router import route_topk, route_topk_reference

    gen = torch.Generator(device="cuda").manual_seed(3)
    logits = torch.randn(8192, 128, device="cuda", generator=gen) * 2
    bias = torch.randn(128, device="cuda", generator=gen) * 0.1
    g_scores = torch.randn(8192, 128, device="cuda", generator=gen)
    g_weights = torch.randn(8192, 6, device="cuda", generator=gen)

    def run(fn):
        leaf = logits.clone().requires_grad_(True)
        scores, idx, weights = fn(leaf, bias, 6, 2.5)
        ((scores * g_scores).sum() + (weights * g_weights).sum()).backward()
        return scores, idx, weights, leaf.grad

    got, want = run(route_topk), run(route_topk_reference)
    assert torch.equal(got[1], want[1])
    for a, b in zip(got[:1] + got[2:], want[:1] + want[2:]):
        assert rel(a, b) < 1e-6


@pytest.mark.parametrize("fast_accum", [True, False])
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("use_tma", [True, False])
def test_fp8_grouped_mm_triton_matches_pytorch_grouped_product(use_tma, persistent, fast_accum):
    """`kernels.fp8_grouped_triton` == PyTorch's `_scaled_grouped_mm` (the training path's
    product) on float8 operands at Nano3's expert widths, uneven groups with an empty one, to
    the BF16 output's rounding and the accumulation order; fast accumulation against CUTLASS's,
    float32 promotion (`promotion_interval`) against CUTLASS's, and both against a float64
    product of the same operands (promotion no further from it than CUTLASS's)."""
    pytest.importorskip("triton")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FP8 tensor cores (and TMA) need sm_90")
    from nemotron.kernels.fp8 import quantize_rows
    from nemotron.kernels.fp8_grouped_triton import grouped_mm_triton

    gen = torch.Generator(device="cuda").manual_seed(3)
    counts = torch.tensor([700, 0, 1, 2305, 129, 4000, 64, 1], device="cuda")
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    rows = int(counts.sum())
    for k, n in ((2688, 1856), (1856, 2688)):
        a_q, a_inv = quantize_rows(torch.randn(rows, k, device="cuda", generator=gen).bfloat16())
        w_q, w_inv = quantize_rows(torch.randn(len(counts), n, k, device="cuda", generator=gen).bfloat16())
        want = torch._scaled_grouped_mm(
            a_q, w_q.transpose(-2, -1), a_inv, w_inv, offs=offs, out_dtype=torch.bfloat16,
            use_fast_accum=fast_accum,
        )  # fmt: skip
        got = grouped_mm_triton(
            a_q,
            a_inv,
            w_q,
            w_inv,
            offs,
            config=(128, 128, 128, 4, 8, use_tma, persistent),
            fast_accum=fast_accum,
        )
        assert rel(got, want) < 5e-3, (k, n, rel(got, want))
        if not fast_accum:
            # float32 results (no BF16 rounding to hide the sums' error) against a float64 product
            # of the same operands: promoted every 128 products, nearer to it than the tensor
            # cores' own accumulator over the whole contraction (fewer mantissa bits than float32)
            exact = torch.empty(rows, n, dtype=torch.float64, device="cuda")
            lo = 0
            for e, hi in enumerate(offs.tolist()):
                a = a_q[lo:hi].double() * a_inv[lo:hi, None].double()
                exact[lo:hi] = a @ (w_q[e].double() * w_inv[e, :, None].double()).t()
                lo = hi
            config = (128, 128, 128, 4, 8, use_tma, persistent)
            promoted, fast = (
                grouped_mm_triton(
                    a_q, a_inv, w_q, w_inv, offs, config=config, out_dtype=torch.float32, fast_accum=f
                )
                for f in (False, True)
            )
            assert rel(promoted, exact) < 0.8 * rel(fast, exact), (
                k,
                n,
                rel(promoted, exact),
                rel(fast, exact),
            )
