"""Triton kernels vs their PyTorch references on CPU under the Triton interpreter.

Run as a script (``TRITON_INTERPRET=1`` must be set before Triton is imported, so the test
module starts a fresh interpreter): ``python interpret_checks.py OUT.json [NAME ...]``. Each check
raises on a mismatch; the script records ``{name: "ok" | error text}`` in OUT.json.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch


def _ssd_inputs(b, l, h, p, g, n, with_state, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen) - 1.0)
    A = -torch.exp(torch.rand(h, generator=gen) * 2.0)
    B = torch.randn(b, l, g, n, generator=gen) * 0.5
    C = torch.randn(b, l, g, n, generator=gen) * 0.5
    s0 = torch.randn(b, h, p, n, generator=gen) if with_state else None
    return [x, dt, A, B, C, s0]


def _ssd_check(l, chunk, with_state, g=2, h=4, final_grad=True):
    from nemotron.kernels.ssd import ssd_chunked_reference
    from nemotron.kernels.ssd_triton import SSD_TRITON_CONFIG, ssd_triton

    SSD_TRITON_CONFIG["block_rows"] = 16  # several row blocks per chunk: exercises the loops
    base = _ssd_inputs(2, l, h, 16, g, 16, with_state)
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(base[0].shape, generator=gen)
    gs = torch.randn(2, h, 16, 16, generator=gen) if final_grad else None

    def run(fn):
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in base]
        y, s = fn(*leaves[:5], chunk, leaves[5])
        loss = (y * gy).sum() + ((s * gs).sum() if gs is not None else 0.0)
        loss.backward()
        return [y, s] + [t.grad for t in leaves if t is not None]

    names = ["y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dinitial_state"]
    for name, got, want in zip(names, run(ssd_triton), run(ssd_chunked_reference)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def _rmsnorm_check(gated, t=37, d=48, group_size=16):
    from nemotron.kernels.rmsnorm import gated_rmsnorm_reference, gated_rmsnorm_triton

    gen = torch.Generator().manual_seed(2)
    y = torch.randn(t, d, generator=gen)
    z = torch.randn(t, d, generator=gen) if gated else None
    w = torch.randn(d, generator=gen)
    gout = torch.randn(t, d, generator=gen)

    def run(fn):
        leaves = [a.clone().requires_grad_(True) for a in (y, z, w) if a is not None]
        yy, zz, ww = (leaves[0], leaves[1], leaves[2]) if gated else (leaves[0], None, leaves[1])
        out = fn(yy.view(1, t, d), None if zz is None else zz.view(1, t, d), ww, group_size)
        (out.view(t, d) * gout).sum().backward()
        return [out] + [a.grad for a in leaves]

    for i, (got, want) in enumerate(zip(run(gated_rmsnorm_triton), run(gated_rmsnorm_reference))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"output/grad {i}: {m}")


def _cross_entropy_check(grad_in_forward, masked):
    from nemotron.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

    gen = torch.Generator().manual_seed(4)
    n, h, v = 29, 16, 300  # vocab not a power of two: exercises the masked tail block
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[2] = -100
    mask = (torch.arange(n) % 4 != 1).float() if masked else None

    def run(fn, **kw):
        hh, ww = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fn(hh, ww, labels, mask, **kw)
        (2.0 * loss).backward()
        return [loss, hh.grad, ww.grad]

    got = run(linear_cross_entropy, chunk_size=8, grad_in_forward=grad_in_forward, backend="triton")
    for i, (a, b) in enumerate(zip(got, run(linear_cross_entropy_reference))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"loss/dh/dw {i}: {m}")


def _conv1d_check(silu, with_bias, strided, b=2, t=37, c=20, k=4):
    from nemotron.kernels.conv1d import causal_conv1d_reference
    from nemotron.kernels.conv1d_triton import CONV1D_TRITON_CONFIG, causal_conv1d_triton

    # Small tiles: several step and channel tiles, a ragged last tile of each.
    CONV1D_TRITON_CONFIG.update(block_t=16, block_c=8)
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(b, t, c + 7, generator=gen)
    x = wide[..., 3:3 + c] if strided else wide[..., :c].contiguous()  # a slice, as in the mixer
    w = torch.randn(c, 1, k, generator=gen)
    bias = torch.randn(c, generator=gen) if with_bias else None
    gy = torch.randn(b, t, c, generator=gen)
    act = "silu" if silu else None

    def run(fn):
        leaves = [a.clone().requires_grad_(True) for a in (x, w, bias) if a is not None]
        xx, ww = leaves[0], leaves[1]
        bb = leaves[2] if with_bias else None
        y = fn(xx, ww, bb, act)
        (y * gy).sum().backward()
        return [y] + [a.grad for a in leaves]

    for i, (got, want) in enumerate(zip(run(causal_conv1d_triton), run(causal_conv1d_reference))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"y/dx/dw/db {i}: {m}")


def _moe_combine_check(tokens=7, k=3, hidden=40, with_add=False):
    from nemotron.kernels.moe_combine import weighted_combine_reference
    from nemotron.kernels.moe_combine_triton import MOE_COMBINE_TRITON_CONFIG, weighted_combine_triton

    MOE_COMBINE_TRITON_CONFIG["block_h"] = 16  # several channel blocks and a ragged last one
    gen = torch.Generator().manual_seed(6)
    experts = torch.stack([torch.randperm(5, generator=gen)[:k] for _ in range(tokens)])
    order = torch.argsort(experts.reshape(-1), stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    rows = torch.randn(tokens * k, hidden, generator=gen)
    weight = torch.rand(tokens, k, generator=gen)
    add = torch.randn(tokens, hidden, generator=gen) if with_add else None
    gy = torch.randn(tokens, hidden, generator=gen)

    def run(fn):
        r, w = rows.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        a = add.clone().requires_grad_(True) if with_add else None
        y = fn(r, order, position, w, a)
        (y * gy).sum().backward()
        return [y, r.grad, w.grad] + ([a.grad] if with_add else [])

    for i, (got, want) in enumerate(zip(run(weighted_combine_triton), run(weighted_combine_reference))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"y/drows/dw/dadd {i}: {m}")


def _relu2_check(dtype, shape=(5, 77), block=64):
    from nemotron.kernels.relu2 import relu2_reference, relu2_triton
    from nemotron.kernels.relu2_triton import RELU2_TRITON_CONFIG

    RELU2_TRITON_CONFIG["block"] = block  # several blocks and a ragged last one
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen).to(dtype)
    x.view(-1)[:3] = torch.tensor([0.0, float("nan"), -0.0])  # relu's edge cases
    if dtype == torch.float64:
        leaf = x.detach().clone().requires_grad_(True)
        leaf.data.view(-1)[1] = 0.5  # gradcheck needs finite inputs
        assert torch.autograd.gradcheck(relu2_triton, (leaf,)), "gradcheck"
    gy = torch.randn(shape, generator=gen).to(dtype)

    def run(fn):
        leaf = x.clone().requires_grad_(True)
        y = fn(leaf)
        y.backward(gy)
        return [y, leaf.grad]

    # the interpreter rounds fp32 -> bf16 by truncation (CUDA rounds to nearest: bitwise equal)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=0, atol=0)
    for i, (got, want) in enumerate(zip(run(relu2_triton), run(relu2_reference))):
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        assert got.isnan().view(-1)[1] and want.isnan().view(-1)[1], "NaN must propagate"
        torch.testing.assert_close(got, want, equal_nan=True, **tol, msg=lambda m, i=i: f"y/dx {i}: {m}")


def _add_n_check(three, block=64):
    from nemotron.kernels.add_n import add_n_reference, add_n_triton
    from nemotron.kernels.add_n_triton import ADD_N_TRITON_CONFIG

    ADD_N_TRITON_CONFIG["block"] = block  # several blocks and a ragged last one
    gen = torch.Generator().manual_seed(8)
    shape = (7, 45)
    # fp32 arithmetic (fp32 + bf16 [+ fp16] inputs, fp32 out: the interpreter truncates bf16
    # stores) and float64 arithmetic (a float64 input)
    ins = [torch.randn(shape, generator=gen), torch.randn(shape, generator=gen).bfloat16()]
    if three:
        ins.append(torch.randn(shape, generator=gen).half())
    for inputs in (ins, [ins[0].double()] + ins[1:]):
        got, want = add_n_triton(inputs, inputs[0].dtype), add_n_reference(inputs, inputs[0].dtype)
        assert got.dtype == inputs[0].dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


CHECKS = {
    "add_n_three_mixed_dtypes": lambda: _add_n_check(True),
    "add_n_two": lambda: _add_n_check(False),
    "relu2_fp32_ragged_blocks": lambda: _relu2_check(torch.float32),
    "relu2_fp64_gradcheck": lambda: _relu2_check(torch.float64, shape=(3, 7, 11)),
    "relu2_bf16_one_block": lambda: _relu2_check(torch.bfloat16, shape=(2, 16), block=4096),
    "moe_weighted_combine": _moe_combine_check,
    "moe_weighted_combine_with_add": lambda: _moe_combine_check(with_add=True),
    "conv1d_silu_bias_strided": lambda: _conv1d_check(True, True, True),
    "conv1d_plain_no_bias": lambda: _conv1d_check(False, False, False, b=1, t=5, k=3),
    "cross_entropy_grad_in_forward": lambda: _cross_entropy_check(True, masked=False),
    "cross_entropy_recompute_masked": lambda: _cross_entropy_check(False, masked=True),
    "gated_rmsnorm": lambda: _rmsnorm_check(gated=True),
    "rmsnorm_plain_one_group": lambda: _rmsnorm_check(gated=False, group_size=48),
    "ssd_divisible": lambda: _ssd_check(l=64, chunk=32, with_state=False),
    "ssd_ragged_with_state": lambda: _ssd_check(l=45, chunk=32, with_state=True),
    "ssd_one_group_no_final_grad": lambda: _ssd_check(l=20, chunk=16, with_state=True, g=1, final_grad=False),
}


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("interpret_checks must run with TRITON_INTERPRET=1")
    out, names = argv[0], argv[1:] or list(CHECKS)
    torch.manual_seed(0)
    results = {}
    for name in names:
        try:
            CHECKS[name]()
            results[name] = "ok"
        except Exception:  # recorded per check; the test reports the text
            results[name] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
