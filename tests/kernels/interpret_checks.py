"""Triton kernels vs their PyTorch references on CPU under the Triton interpreter.

Run as a script (``TRITON_INTERPRET=1`` must be set before Triton is imported, so the test
module starts a fresh interpreter): ``python interpret_checks.py OUT.json [--claim-in DIR] [NAME
...]``. Each check raises on a mismatch; the script records ``{name: "ok" | error text}`` in
OUT.json, and in ``OUT.launches.json``, per check, every kernel it launched with the argument
types and constexpr values of its first launch (`test_triton_compile.py` compiles each for a GPU:
the interpreter runs code the GPU compiler refuses). With ``--claim-in DIR`` several processes
share the checks: each runs those it claims first (a file named after the check, created in DIR
only if absent), so none waits idle while another has a long check left.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

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


def _rmsnorm_check(gated, t=37, d=48, group_size=16, strided_gate=False):
    from nemotron.kernels.rmsnorm import gated_rmsnorm_reference, gated_rmsnorm_triton

    gen = torch.Generator().manual_seed(2)
    y = torch.randn(t, d, generator=gen)
    z = torch.randn(t, d, generator=gen) if gated else None
    if strided_gate:  # the gate as a row-strided slice of a wider buffer (the in-projection output)
        z = torch.cat([torch.randn(t, 5, generator=gen), z, torch.randn(t, 3, generator=gen)], 1)[
            :, 5 : 5 + d
        ]
    w = torch.randn(d, generator=gen)
    gout = torch.randn(t, d, generator=gen)

    def run(fn):
        leaves = [a.clone().requires_grad_(True) for a in (y, z, w) if a is not None]
        yy, zz, ww = (leaves[0], leaves[1], leaves[2]) if gated else (leaves[0], None, leaves[1])
        out = fn(yy.view(1, t, d), None if zz is None else zz.view(1, t, d), ww, group_size)
        (out.view(t, d) * gout).sum().backward()
        return [out] + [a.grad for a in leaves]

    for i, (got, want) in enumerate(zip(run(gated_rmsnorm_triton), run(gated_rmsnorm_reference))):
        torch.testing.assert_close(
            got, want, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"output/grad {i}: {m}"
        )


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


def _cross_entropy_bad_label_check():
    """A label outside [0, V) (-1, V, far past it) in the Triton row kernel: NaN loss and
    gradient row, no read past the row (the kernel loaded logits[row, label] unmasked: another
    row's logit, here the next row's first ones, as a finite wrong loss); the other rows equal
    the PyTorch path's. The FP8 gradient tiles: the row NaN, the others as before."""
    from nemotron.kernels.cross_entropy import _rows_torch
    from nemotron.kernels.cross_entropy_triton import cross_entropy_rows, logit_grad_fp8

    gen = torch.Generator().manual_seed(15)
    m, v = 6, 40
    logits = torch.randn(m, v, generator=gen) * 3.0
    labels = torch.tensor([3, -1, 40, 7, 10**6, 39])
    good = torch.tensor([True, False, False, True, False, True])
    scale = torch.rand(m, generator=gen)
    for row_scale in (None, scale):
        got_buf, want_buf = logits.clone(), logits.clone()
        loss, lse = cross_entropy_rows(got_buf, labels, row_scale)
        want_loss, want_lse, want_grad = _rows_torch(want_buf, labels, row_scale)
        assert loss[~good].isnan().all() and not loss[good].isnan().any(), loss
        torch.testing.assert_close(loss, want_loss, equal_nan=True)
        torch.testing.assert_close(lse, want_lse)
        if row_scale is not None:
            assert got_buf[~good].isnan().all() and got_buf[good].isfinite().all()
            torch.testing.assert_close(got_buf, want_grad, rtol=1e-5, atol=1e-6, equal_nan=True)
    gq, gqt = torch.empty(m, v), torch.empty(v, m)
    one = torch.tensor(1.0)
    logit_grad_fp8(logits, lse, labels, scale, one, one, gq, gqt, clamp_rows=448.0, clamp_cols=57344.0)
    want_g = _rows_torch(logits.clone(), labels, scale)[2]
    assert gq[~good].isnan().all() and gqt[:, ~good].isnan().all()
    torch.testing.assert_close(gq[good], want_g[good], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gqt.t()[good], want_g[good], rtol=1e-5, atol=1e-6)


def _cross_entropy_nan_logit_check():
    """A NaN logit anywhere in a row makes the Triton row kernel's loss and lse NaN, as the PyTorch
    path's (the online max ignored NaN, so one in the first vocabulary block, not the label,
    dropped out of the sum: a finite loss with a NaN gradient); other rows unchanged. One block
    (V = 300) and two (V = 4100, NaN in each block)."""
    from nemotron.kernels.cross_entropy import _rows_torch
    from nemotron.kernels.cross_entropy_triton import cross_entropy_rows

    gen = torch.Generator().manual_seed(17)
    for v, nan_cols in ((300, (5, 299)), (4100, (5, 4097))):
        logits = torch.randn(4, v, generator=gen)
        for row, col in enumerate(nan_cols):
            logits[row, col] = float("nan")
        labels = torch.tensor([7, 7, 7, 7])
        for row_scale in (None, torch.rand(4, generator=gen)):
            got_buf, want_buf = logits.clone(), logits.clone()
            loss, lse = cross_entropy_rows(got_buf, labels, row_scale)
            want_loss, want_lse, want_grad = _rows_torch(want_buf, labels, row_scale)
            assert loss[:2].isnan().all() and lse[:2].isnan().all(), (v, loss.tolist())
            torch.testing.assert_close(loss, want_loss, equal_nan=True)
            torch.testing.assert_close(lse, want_lse, equal_nan=True)
            if row_scale is not None:
                torch.testing.assert_close(got_buf, want_grad, rtol=1e-5, atol=1e-6, equal_nan=True)


def _ce_grad_fp8_check():
    """`logit_grad_fp8` (the FP8 LM head's logit gradient, both layouts from one pass) == the
    PyTorch formula: first with float8 outputs (the launch the GPU compile test builds; the
    interpreter's float8 rounding is not IEEE, so within one step of the format), then with
    float32 outputs standing for them: the scaled, clamped values before rounding. Rows and
    vocabulary not multiples of the tile, an ignored row (scale 0), rows scaled differently, a
    scale large enough to clamp, the transposed copy written into a column slice of a wider
    buffer whose other columns stay untouched."""
    from nemotron.kernels.cross_entropy_triton import logit_grad_fp8

    gen = torch.Generator().manual_seed(11)
    m, v, off, width = 37, 300, 3, 48
    logits = (torch.randn(m, v, generator=gen) * 3.0).bfloat16()
    labels = torch.randint(0, v, (m,), generator=gen)
    row_scale = torch.rand(m, generator=gen) / m
    row_scale[4] = 0.0
    lse = torch.logsumexp(logits.float(), dim=-1)
    g = torch.exp(logits.float() - lse[:, None]) * row_scale[:, None]
    g[torch.arange(m), labels] -= row_scale
    for scale_rows, scale_cols in ((2.0**10, 2.0**17), (2.0**20, 2.0**30)):  # the second clamps
        sr, sc = torch.tensor(scale_rows), torch.tensor(scale_cols)
        want_rows = (g * sr).clamp(-448.0, 448.0)
        want_cols = (g * sc).clamp(-57344.0, 57344.0).t()
        gq8 = torch.empty(m, v, dtype=torch.float8_e4m3fn)
        gqt8 = torch.zeros(v, width, dtype=torch.float8_e5m2)
        logit_grad_fp8(logits, lse, labels, row_scale, sr, sc, gq8, gqt8[:, off:])
        # (the interpreter's float8 conversion is off by up to half a value in a few elements)
        torch.testing.assert_close(gq8.float(), want_rows, rtol=0.5, atol=2**-8)
        torch.testing.assert_close(gqt8[:, off : off + m].float(), want_cols, rtol=0.5, atol=2**-15)
        gq = torch.empty(m, v)
        gqt = torch.full((v, width), 7.0)
        logit_grad_fp8(
            logits, lse, labels, row_scale, sr, sc, gq, gqt[:, off:], clamp_rows=448.0, clamp_cols=57344.0
        )
        torch.testing.assert_close(gq, want_rows, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gqt[:, off : off + m], want_cols, rtol=1e-5, atol=1e-6)
        assert torch.all(gqt[:, :off] == 7.0) and torch.all(gqt[:, off + m :] == 7.0)
        assert torch.all(gq[4] == 0.0)
        # another tile (`GRAD_FP8_TILES`): the same values
        gq_c, gqt_c = torch.empty(m, v), torch.full((v, width), 7.0)
        logit_grad_fp8(
            logits, lse, labels, row_scale, sr, sc, gq_c, gqt_c[:, off:], clamp_rows=448.0,
            clamp_cols=57344.0, tile=(16, 64, 4),
        )  # fmt: skip
        assert torch.equal(gq_c, gq) and torch.equal(gqt_c, gqt)
    assert float(gq.abs().max()) == 448.0 and float(gqt.abs().max()) == 57344.0


def _fp8_head_check():
    """linear_cross_entropy(fp8=True) with the Triton kernels (row pass + FP8 gradient tiles)
    == with the PyTorch formulation, within the float8 roundings (the interpreter's float8
    conversion is not IEEE): loss, hidden and weight gradients, two weight-gradient groups."""
    from nemotron.kernels import cross_entropy as ce

    gen = torch.Generator().manual_seed(12)
    n, h, v = 45, 32, 160
    hidden = torch.randn(n, h, generator=gen).bfloat16()
    weight = (torch.randn(v, h, generator=gen) * 0.3).bfloat16()
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[6] = -100
    outs = []
    for backend in ("triton", "torch"):
        hh, ww = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = ce.linear_cross_entropy(
            hh, ww, labels, chunk_size=16, backend=backend, fp8=True, fp8_group_rows=32
        )
        loss.backward()
        outs.append([loss.detach().float(), hh.grad.float(), ww.grad.float()])
    for i, (a, b) in enumerate(zip(*outs)):
        rel = float((a - b).norm() / b.norm())
        assert rel < (1e-5 if i == 0 else 0.1), f"loss/dh/dw {i}: relative difference {rel:.2e}"


def _conv1d_check(silu, with_bias, strided, b=2, t=37, c=20, k=4):
    from nemotron.kernels.conv1d import causal_conv1d_reference
    from nemotron.kernels.conv1d_triton import CONV1D_TRITON_CONFIG, causal_conv1d_triton

    # Small tiles: several step and channel tiles, a ragged last tile of each.
    CONV1D_TRITON_CONFIG.update(block_t=16, block_c=8)
    gen = torch.Generator().manual_seed(5)
    wide = torch.randn(b, t, c + 7, generator=gen)
    x = wide[..., 3 : 3 + c] if strided else wide[..., :c].contiguous()  # a slice, as in the mixer
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
        torch.testing.assert_close(
            got, want, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"y/drows/dw/dadd {i}: {m}"
        )


def _moe_combine_fp8_rows_check(tokens=9, k=3, hidden=40):
    """The combine's backward writing the row gradients per-row quantized (`row_grad_fp8`): the
    values (as float32 before the e4m3 rounding, see `_fp8_rows_check`) and scales of
    `quantize_rows` of the BF16 row gradients, bit for bit, and the same weight gradients.
    Weights of both signs and a zero weight, token gradients of mixed magnitude, a zero token."""
    from nemotron.kernels.fp8 import quantize_rows
    from nemotron.kernels.moe_combine_triton import MOE_COMBINE_TRITON_CONFIG, combine_backward_triton

    MOE_COMBINE_TRITON_CONFIG["block_h"] = 16  # the amax pass and the writes over several blocks
    gen = torch.Generator().manual_seed(12)
    experts = torch.stack([torch.randperm(5, generator=gen)[:k] for _ in range(tokens)])
    order = torch.argsort(experts.reshape(-1), stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    rows = torch.randn(tokens * k, hidden, generator=gen).bfloat16()
    weight = torch.randn(tokens, k, generator=gen)
    weight[1, 2] = 0.0
    dy = (torch.randn(tokens, hidden, generator=gen) * torch.logspace(-6, 3, tokens)[:, None]).bfloat16()
    dy[4] = 0.0
    bf16_rows, no_inv, dw_plain = combine_backward_triton(rows, position, weight, dy)
    got_q, got_inv, dw = combine_backward_triton(rows, position, weight, dy, fp8_rows_dtype=torch.float32)
    assert no_inv is None and bf16_rows is not None and got_q is not None and got_inv is not None
    want_q, want_inv = quantize_rows(bf16_rows)
    assert torch.equal(got_inv, want_inv), (got_inv - want_inv).abs().max()
    got_bits = got_q.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(got_bits, want_q.view(torch.uint8)), (got_bits != want_q.view(torch.uint8)).sum()
    assert dw is not None and dw_plain is not None and torch.equal(dw, dw_plain)
    # the BF16 rows themselves: w * dy at each row's position (within a BF16 rounding: the
    # interpreter's own conversion to BF16)
    want_rows = (dy.float()[:, None, :] * weight[:, :, None]).view(tokens * k, -1)[order]
    torch.testing.assert_close(bf16_rows.float(), want_rows, rtol=8e-3, atol=0)
    only_rows = combine_backward_triton(rows, position, weight, dy, True, False, torch.float32)
    assert only_rows[2] is None and torch.equal(only_rows[0], got_q)


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


def _fp8_rows_check(shape, relu2):
    """The one-pass rowwise FP8 quantization == `quantize_rows` (of relu(x)^2 with `relu2`):
    the same power-of-two inverse scales and, rounded to float8 by PyTorch (the interpreter's
    own float8 conversion is not IEEE round-to-nearest; the GPU test compares the kernel's),
    the same values, bit for bit. Rows of mixed magnitude, an all-zero row, a NaN element
    (stays NaN, does not set its row's scale), a row count that is not a multiple of the rows
    per program."""
    from nemotron.kernels.fp8 import quantize_rows, relu2_rows
    from nemotron.kernels.fp8_triton import MAX_ROW, quantize_rows_triton

    gen = torch.Generator().manual_seed(9)
    x = torch.randn(shape, generator=gen)
    x = (x * torch.logspace(-8, 4, x.shape[-2])[:, None]).bfloat16()
    flat = x.view(-1, shape[-1])
    flat[1] = 0.0
    flat[2, 3] = float("nan")
    got_q, got_inv = quantize_rows_triton(x, relu2=relu2, out_dtype=torch.float32)
    want_q, want_inv = (relu2_rows if relu2 else quantize_rows)(x)
    assert got_q.shape == want_q.shape == x.shape and got_inv.shape == want_inv.shape == x.shape[:-1]
    assert torch.equal(got_inv, want_inv), (got_inv - want_inv).abs().max()
    got_bits = got_q.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(got_bits, want_q.view(torch.uint8)), (got_bits != want_q.view(torch.uint8)).sum()
    assert got_q.view(-1, shape[-1])[2, 3].isnan() and torch.all(got_q.view(-1, shape[-1])[1] == 0)
    for cols in (MAX_ROW + 16, 0):  # too wide for registers; no elements to scale
        try:
            quantize_rows_triton(torch.zeros(2, cols))
        except ValueError as err:
            assert str(MAX_ROW) in str(err)
        else:
            raise AssertionError(f"rows of {cols} elements must be refused")
    empty_q, empty_inv = quantize_rows_triton(torch.zeros(0, 64))
    assert empty_q.shape == (0, 64) and empty_inv.shape == (0,)


def _fp8_transposed_check(shape=(3, 37, 77), tile=None):
    """The FP8 experts' gathered forms from float32 master weights (`train.fp8_gather`): the
    transposed pass == `quantize_transposed` of the BF16 weight with the matrix's scale, and the
    per-row pass with BF16 rounding written into given buffers == `quantize_rows` of the BF16
    weight, bit for bit (values rounded to float8 by PyTorch, see `_fp8_rows_check`). Rows of
    mixed magnitude, a NaN element, an all-zero matrix, ragged tiles, strided outputs.
    `tests/train/test_gpu_fp8.py` checks the BF16 rounding of arbitrary float32 on a GPU."""
    from nemotron.kernels.fp8 import quantize_rows, quantize_transposed
    from nemotron.kernels.fp8_triton import quantize_rows_triton, quantize_transposed_triton

    gen = torch.Generator().manual_seed(41)
    e, n, k = shape
    w = torch.randn(shape, generator=gen) * torch.logspace(-6, 3, n)[None, :, None]
    # float32 values BF16 holds exactly: the interpreter's float32 -> BF16 conversion is not
    # round-to-nearest-even (the GPU test rounds arbitrary float32 on the device)
    w = w.bfloat16().float()
    w[0, 2, 5] = float("nan")
    w[-1] = 0.0
    want_q, want_inv = quantize_rows(w.bfloat16())
    matrix_inv = want_inv.amax(-1)
    want_t, _ = quantize_transposed(w.bfloat16(), matrix_inv)
    # strided outputs: row slices of wider buffers, as `pack_forms` writes into views
    rows_buf = torch.empty(e * n, k + 3)
    inv_buf = torch.empty(e * n)
    got_q, got_inv = quantize_rows_triton(
        w, out_dtype=torch.float32, round_bf16=True, out=(rows_buf[:, :k], inv_buf)
    )
    assert got_q.data_ptr() == rows_buf.data_ptr() and got_inv is inv_buf
    assert torch.equal(got_inv.view(e, n), want_inv), (got_inv.view(e, n) - want_inv).abs().max()
    # NaN compared as NaN (the interpreter's conversion may set its sign bit), the rest by bits
    assert got_q.view(e, n, k)[0, 2, 5].isnan() and want_q[0, 2, 5].float().isnan()
    got_q.view(e, n, k)[0, 2, 5] = 0.0
    want_q[0, 2, 5] = 0.0
    bits = got_q.to(torch.float8_e4m3fn).view(torch.uint8).view(e, n, k)
    assert torch.equal(bits, want_q.view(torch.uint8)), (bits != want_q.view(torch.uint8)).sum()
    t_buf = torch.empty(e, k, n + 5)
    got_t = quantize_transposed_triton(
        w, matrix_inv, out_dtype=torch.float32, round_bf16=True, out=t_buf[:, :, :n], tile=tile
    )
    assert got_t.shape == want_t.shape
    assert got_t[0, 5, 2].isnan() and want_t[0, 5, 2].float().isnan()
    got_t[0, 5, 2] = 0.0
    want_t[0, 5, 2] = 0.0
    t_bits = got_t.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(t_bits, want_t.view(torch.uint8)), (t_bits != want_t.view(torch.uint8)).sum()
    for bad in (torch.empty(e, k, n + 1), torch.empty(e, n, k)):
        try:
            quantize_transposed_triton(w, matrix_inv, out=bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"an out of shape {tuple(bad.shape)} must be refused")


def _fp8_rows_to_check(tokens=37, k=3, cols=77):
    """One pass quantizing each token's row and writing it to its k places (the MoE dispatch of
    FP8 rows) against `quantize_rows_to` (itself checked against `quantize_rows` of the gathered
    rows): values bit for bit, scales equal; a zero row, a NaN, a ragged last program."""
    from nemotron.kernels.fp8 import quantize_rows, quantize_rows_to
    from nemotron.kernels.fp8_triton import quantize_rows_to_triton

    gen = torch.Generator().manual_seed(13)
    x = (torch.randn(tokens, cols, generator=gen) * torch.logspace(-6, 3, tokens)[:, None]).bfloat16()
    x[1] = 0.0
    x[2, 3] = float("nan")
    order = torch.randperm(tokens * k, generator=gen)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    want_q, want_inv = quantize_rows_to(x, position, k)
    gathered_q, gathered_inv = quantize_rows(x[order // k])  # gather, then quantize
    assert torch.equal(want_q.view(torch.uint8), gathered_q.view(torch.uint8))
    assert torch.equal(want_inv, gathered_inv)
    got_q, got_inv = quantize_rows_to_triton(x, position, k, out_dtype=torch.float32)
    assert torch.equal(got_inv, want_inv), (got_inv - want_inv).abs().max()
    got_bits = got_q.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(got_bits, want_q.view(torch.uint8)), (got_bits != want_q.view(torch.uint8)).sum()
    try:
        quantize_rows_to_triton(x, position[:-1], k)
    except ValueError as err:
        assert "positions" in str(err)
    else:
        raise AssertionError("a position count that is not tokens x k must be refused")


def _fp8_wgrad_inputs(counts, cols_a=40, cols_b=24):
    """Row-quantized (values as float32: see `_fp8_rows_check`) operands of an expert-sorted
    weight gradient: rows of mixed magnitude, `counts` rows per expert."""
    from nemotron.kernels.fp8 import quantize_rows
    from nemotron.kernels.fp8_wgrad import expert_rows

    gen = torch.Generator().manual_seed(11)
    rows = sum(counts)
    offs = torch.cumsum(torch.tensor(counts), 0).int()
    layout = expert_rows(offs, rows)
    a = (
        torch.randn(rows, cols_a, generator=gen)
        * torch.logspace(-4, 1, rows)[torch.randperm(rows, generator=gen)][:, None]
    )
    b = torch.randn(rows, cols_b, generator=gen)
    (a_q, a_inv), (b_q, b_inv) = quantize_rows(a), quantize_rows(b)
    return layout, a_q, a_inv, b_q, b_inv


def _fp8_transposed_groups_check(counts):
    """The transposed, expert-scaled forms == the reference, bit for bit (float32 values; the
    GPU test compares the float8 ones), zeros at every padded position; each expert's
    inverse scale the largest of its rows'."""
    from nemotron.kernels.fp8_wgrad import GROUP_ALIGN, transposed_groups_reference
    from nemotron.kernels.fp8_wgrad_triton import transposed_groups_triton

    layout, a_q, a_inv, _, _ = _fp8_wgrad_inputs(counts)
    got, got_e = transposed_groups_triton(a_q, a_inv, layout, out_dtype=torch.float32)
    want, want_e = transposed_groups_reference(a_q, a_inv, layout, out_dtype=torch.float32)
    assert got.shape == want.shape == (a_q.shape[1], layout.padded) and layout.padded % GROUP_ALIGN == 0
    assert torch.equal(got_e, want_e) and torch.equal(got, want), (got - want).abs().max()
    assert torch.all(got[:, layout.source < 0] == 0)
    lo = 0
    for e, c in enumerate(counts):
        if c:
            assert want_e[e] == a_inv[lo : lo + c].max()
        lo += c


def _fp8_transposed_groups_nan_check():
    """A NaN among the row-quantized values (`quantize_rows` keeps NaN): the transposed form has
    NaN at its place, as the reference (the kernel's clamp turned it into a finite +-448, so a
    diverged step's expert weight gradient came out finite); the other values bit for bit."""
    from nemotron.kernels.fp8_wgrad import transposed_groups_reference
    from nemotron.kernels.fp8_wgrad_triton import transposed_groups_triton

    layout, a_q, a_inv, _, _ = _fp8_wgrad_inputs([5, 0, 17])
    a_q = a_q.float()
    a_q[3, 7] = float("nan")
    a_q[20, 0] = float("nan")
    got, _ = transposed_groups_triton(a_q, a_inv, layout, out_dtype=torch.float32)
    want, _ = transposed_groups_reference(a_q, a_inv, layout, out_dtype=torch.float32)
    assert int(want.isnan().sum()) == 2 and torch.equal(got.isnan(), want.isnan()), (
        f"{int(got.isnan().sum())} NaN, the reference {int(want.isnan().sum())}"
    )
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def _fp8_grouped_weight_grad_check(counts, block_k):
    """The grouped weight-gradient kernel == the float32 reference per expert (operands as
    float32: the interpreter has no float8 products), an expert with no rows all zeros."""
    from nemotron.kernels.fp8_wgrad import grouped_weight_grad_reference, transposed_groups_reference
    from nemotron.kernels.fp8_wgrad_triton import grouped_weight_grad_triton

    layout, a_q, a_inv, b_q, b_inv = _fp8_wgrad_inputs(counts)
    at, a_e = transposed_groups_reference(a_q, a_inv, layout, out_dtype=torch.float32)
    bt, b_e = transposed_groups_reference(b_q, b_inv, layout, out_dtype=torch.float32)
    want = grouped_weight_grad_reference(at, a_e, bt, b_e, layout).float()
    got = grouped_weight_grad_triton(
        at, a_e, bt, b_e, layout, out_dtype=torch.float32, config=(32, 16, block_k, 4, 2)
    )
    assert got.shape == (len(counts), 40, 24)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.all(got[e] == 0)
    # summed into a float32 buffer in the epilogue (`accumulate_into`): the buffer's values plus
    # the same product, exactly the float32 additions of the two (an expert with no rows: the
    # buffer unchanged); the reference sums the same way
    before = torch.randn(got.shape, generator=torch.Generator().manual_seed(5))
    into = before.clone()
    summed = grouped_weight_grad_triton(
        at, a_e, bt, b_e, layout, config=(32, 16, block_k, 4, 2), accumulate_into=into
    )
    assert summed is into and torch.equal(summed, before + got)
    ref_into = before.clone()
    grouped_weight_grad_reference(at, a_e, bt, b_e, layout, accumulate_into=ref_into)
    torch.testing.assert_close(ref_into, before + want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    # `round_bf16` (what a BF16 weight gradient holds, `train.experts_float32_grads` off): the
    # epilogue rounds the same float32 product to BF16 (to nearest even), then stores it, or adds
    # it to the buffer in float32; the reference rounds its own product the same way
    rounded = grouped_weight_grad_triton(
        at, a_e, bt, b_e, layout, out_dtype=torch.float32, config=(32, 16, block_k, 4, 2), round_bf16=True
    )
    assert torch.equal(rounded, got.bfloat16().float())
    assert not torch.equal(rounded, got)  # the rounding did something at these values
    into = before.clone()
    grouped_weight_grad_triton(
        at, a_e, bt, b_e, layout, config=(32, 16, block_k, 4, 2), accumulate_into=into, round_bf16=True
    )
    assert torch.equal(into, before + got.bfloat16().float())
    ref_rounded = grouped_weight_grad_reference(
        at, a_e, bt, b_e, layout, out_dtype=torch.float32, round_bf16=True
    )
    assert torch.equal(ref_rounded, ref_rounded.bfloat16().float())
    torch.testing.assert_close(ref_rounded, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    for bad in (torch.zeros(got.shape, dtype=torch.bfloat16), torch.zeros(1, 40, 24)):
        try:
            grouped_weight_grad_triton(at, a_e, bt, b_e, layout, accumulate_into=bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"accumulate_into {bad.dtype} {tuple(bad.shape)} must be refused")


def _expert_weight_grad_check(counts, tiles, m=40, n=24):
    """The BF16 experts' float32 weight-gradient kernel (`expert_wgrad_triton`) == a float64
    product per expert of the same values (operands BF16-exact, held as float32: the
    interpreter's BF16 products are not IEEE), experts without rows all zeros; rows not
    multiples of BLOCK_K and widths not multiples of the tiles; summed into a float32 buffer in
    the epilogue exactly as the float32 addition of buffer and product."""
    from nemotron.kernels.expert_wgrad import expert_weight_grad_reference
    from nemotron.kernels.expert_wgrad_triton import expert_weight_grad_triton

    g = torch.Generator().manual_seed(11)
    rows = sum(counts)
    grad = torch.randn(rows, m, generator=g).bfloat16().float()
    inp = torch.randn(rows, n, generator=g).bfloat16().float()
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    got = expert_weight_grad_triton(grad, inp, offs, config=tiles)
    assert got.dtype == torch.float32 and got.shape == (len(counts), m, n)
    start = 0
    for e, c in enumerate(counts):
        exact = grad[start : start + c].double().t() @ inp[start : start + c].double()
        if c == 0:
            assert torch.all(got[e] == 0), e
        else:
            err = float((got[e].double() - exact).norm() / exact.norm())
            assert err < 1e-6, (e, err)
        start += c
    torch.testing.assert_close(got, expert_weight_grad_reference(grad, inp, offs), rtol=1e-5, atol=1e-5)
    before = torch.randn(got.shape, generator=g)
    into = before.clone()
    summed = expert_weight_grad_triton(grad, inp, offs, accumulate_into=into, config=tiles)
    assert summed is into and torch.equal(summed, before + got)
    for bad in (torch.zeros(got.shape, dtype=torch.bfloat16), torch.zeros(1, m, n)):
        try:
            expert_weight_grad_triton(grad, inp, offs, accumulate_into=bad, config=tiles)
        except ValueError:
            pass
        else:
            raise AssertionError(f"accumulate_into {bad.dtype} {tuple(bad.shape)} must be refused")


def _fp8_grouped_mm_check(counts, use_tma, persistent=False, k=40, n=24):
    """The Triton grouped product == a float64 product per group (operands as float32 values
    of float8 numbers: the interpreter has no float8 products; float32 out), for groups of 0,
    1 and many rows, a contraction (40) and a width (24) that are not multiples of the tiles,
    through TMA descriptors and through pointers, a program per tile and persistent programs."""
    from nemotron.kernels.fp8 import quantize_rows
    from nemotron.kernels.fp8_grouped_triton import grouped_mm_triton

    gen = torch.Generator().manual_seed(23)
    rows, experts = sum(counts), len(counts)
    offs = torch.cumsum(torch.tensor(counts), 0).int()
    a_q, a_inv = quantize_rows(torch.randn(rows, k, generator=gen) * torch.logspace(-3, 2, rows)[:, None])
    b_q, b_inv = quantize_rows(torch.randn(experts * n, k, generator=gen))
    a_q, b_q = a_q.float(), b_q.float().view(experts, n, k)
    b_inv = b_inv.view(experts, n)
    got = grouped_mm_triton(
        a_q, a_inv, b_q, b_inv, offs, config=(32, 16, 32, 2, 4, use_tma, persistent), out_dtype=torch.float32
    )
    lo = 0
    for e, c in enumerate(counts):
        want = (a_q[lo : lo + c].double() * a_inv[lo : lo + c, None].double()) @ (
            b_q[e].double() * b_inv[e, :, None].double()
        ).t()
        torch.testing.assert_close(
            got[lo : lo + c].double(), want, rtol=1e-5, atol=1e-6 * (float(want.abs().max()) if c else 1.0)
        )
        lo += c


def _fp8_grouped_mm_tiles_check():
    """The row-tile list: every group's rows covered once, in order, by tiles of at most
    BLOCK_M rows that never start in another group; unused slots marked -1."""
    from nemotron.kernels.fp8_grouped_triton import row_tiles

    counts = [5, 0, 64, 65, 0, 1, 128]
    offs = torch.cumsum(torch.tensor(counts), 0).int()
    group, first, end, used = row_tiles(offs, 64, 12)
    # (group, first row, the group's end)
    want = [(0, 0, 5), (2, 5, 69), (3, 69, 134), (3, 133, 134), (5, 134, 135), (6, 135, 263), (6, 199, 263)]
    got = [(int(g), int(f), int(e)) for g, f, e in zip(group, first, end) if g >= 0]
    assert got == want and int(used) == len(want), got
    assert torch.all(group[len(want) :] == -1)


@contextlib.contextmanager
def _bf16_rounded_to_nearest():
    """The interpreter converts float32 to BF16 by dropping the low bits (its `_convert_float`
    with no rounding mode: 1 BF16 ulp toward zero in ~half the values); the GPU rounds to
    nearest even (`cvt.rn.bf16.f32`), as PyTorch does. Within this scope the interpreter rounds
    as the GPU does, so a kernel writing BF16 can be compared with PyTorch's BF16 results."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = interpreter._convert_float

    def nearest(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            values = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
            return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return truncating(data, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = nearest
    try:
        yield
    finally:
        interpreter._convert_float = truncating


def _close_per_part(name, got, want, bounds, rtol=2e-3):
    """got == want (BF16 results of the same roundings, sums in another order) within `rtol` of
    each part's norm: the rows of each group (`bounds`: row ranges) or each expert's matrix."""
    for i, part in enumerate(bounds):
        g, w = got[part].detach().double(), want[part].detach().double()
        if w.numel() == 0:
            continue
        err = float((g - w).norm() / max(float(w.norm()), 1e-30))
        assert err < rtol, f"{name} part {i}: relative difference {err:.2e}"


def _fp8_expert_mlp_triton_check(weight_grad, tiles, fp8_rows=False, fast_accum=True, gathered=False):
    """`fp8_expert_mlp` with `grouped_gemm="triton"` (the forward and input-gradient products by
    `kernels.fp8_grouped_triton` in the interpreter) == the emulated roundings (what "cutlass"
    computes), per tensor and per expert: output, input gradient, both weight gradients; groups
    of 0, 1 and many rows (one not a multiple of the tile), a trailing empty group, widths that
    are not multiples of BLOCK_K; `fp8_rows`: the rows arrive as `Fp8Rows`; `gathered`: the
    weights as the FP8 forms FSDP2 gathers (`ExpertFp8Forms`, through the experts module), which
    each product reads where the gather put them (no copy per call)."""
    from torch import nn

    from nemotron.kernels.fp8 import quantize_rows
    from nemotron.kernels.fp8_rows import Fp8Rows
    from nemotron.models.nano3.moe import GroupedExperts
    from nemotron.train.fp8 import Float8GroupedExperts
    from nemotron.train.fp8_gather import ExpertFp8Forms, pack_forms, unpack_forms
    from nemotron.train.fp8_grouped import grouped_product_runs

    counts = [7, 0, 1, 70, 13, 0]
    experts, hidden, ffn = len(counts), 64, 48
    gen = torch.Generator().manual_seed(31)
    base = GroupedExperts(
        num_experts=experts, hidden_size=hidden, ffn_hidden_size=ffn, init_std=0.1, output_init_std=0.05
    )
    base.reset_parameters()
    rows = sum(counts)
    # rows of very different magnitudes: every row its own scale
    x = (torch.randn(rows, hidden, generator=gen) * torch.logspace(-2, 2, rows)[:, None]).bfloat16()
    g = torch.randn(rows, hidden, generator=gen).bfloat16()
    counts_t = torch.tensor(counts)
    got_layer: list = []

    def run(triton: bool):
        layer = Float8GroupedExperts(
            base if not triton else _copy_experts(base),
            emulate=not triton,
            fast_accum=fast_accum,
            weight_grad=weight_grad,
            grouped_gemm="triton" if triton else "cutlass",
            grouped_tiles=tiles,
        )
        # the kernel itself runs (in the interpreter), not the emulation
        assert (
            triton == grouped_product_runs(layer.grouped_gemm, x.device) and not layer.emulate or not triton
        )
        if gathered and triton:
            for name in ("up_proj", "down_proj"):
                w = getattr(layer, name).detach().bfloat16()
                forms = ExpertFp8Forms(*unpack_forms(pack_forms(w), *w.shape[1:]), dtype=torch.bfloat16)
                setattr(layer, name, nn.Parameter(forms))
        for p in layer.parameters():
            p.grad = None
        xi = x.clone().requires_grad_(True)
        inp = Fp8Rows(*quantize_rows(xi.detach())).requires_grad_(True) if fp8_rows else xi
        out = layer(inp, counts_t)
        out.backward(g)
        grad_x = inp.grad
        got_layer[:] = [layer]
        return out, grad_x, layer.up_proj.grad, layer.down_proj.grad

    want = run(False)
    from nemotron.kernels import fp8_grouped_triton

    kernel, seen = fp8_grouped_triton.grouped_mm_triton, []

    def recording(a_q, a_inv, b_t_q, b_inv, offs, **kwargs):
        # what reaches the kernel: contiguous operands and float32 scales are used in place
        seen.append((b_t_q.data_ptr(), a_q.is_contiguous() and b_t_q.is_contiguous()))
        seen[-1] += (a_inv.dtype == b_inv.dtype == torch.float32 and b_inv.is_contiguous(),)
        return kernel(a_q, a_inv, b_t_q, b_inv, offs, **kwargs)

    fp8_grouped_triton.grouped_mm_triton = recording
    try:
        with _bf16_rounded_to_nearest():
            got = run(True)
    finally:
        fp8_grouped_triton.grouped_mm_triton = kernel
    assert len(seen) == 4 and all(ok and scales for _, ok, scales in seen), seen
    if gathered:  # each product read its weight form where FSDP2's gather put it: no copy
        forms = [getattr(got_layer[0], name) for name in ("up_proj", "down_proj")]
        where = {f.rows_q.data_ptr() for f in forms} | {f.t_q.data_ptr() for f in forms}
        assert {ptr for ptr, _, _ in seen} == where, (seen, where)
    groups = []
    lo = 0
    for c in counts:
        groups.append(slice(lo, lo + c))
        lo += c
    for name, a, b in zip(("out", "grad_x", "grad_up", "grad_down"), got, want):
        assert a is not None and b is not None and a.shape == b.shape, name
        assert torch.isfinite(a.float()).all(), name
        _close_per_part(name, a.float(), b.float(), groups if name in ("out", "grad_x") else range(experts))
    for e, c in enumerate(counts):
        if c == 0:  # an expert without rows: no gradient
            assert got[2][e].abs().sum() == 0 and got[3][e].abs().sum() == 0


def _copy_experts(experts):
    import copy

    return copy.deepcopy(experts)


def _fp8_training_triton_check():
    """Two optimizer steps of a small model (two MoE layers around attention) with its
    routed experts in FP8 (FP8 weight gradients and FP8 dispatch, so the rows and the output
    gradient arrive as `Fp8Rows`, and the LM head) through `apply_fp8` and `train_step`, with
    `experts_grouped_gemm="triton"` (the kernel in the interpreter) == "cutlass" (emulated on
    CPU): each step's loss, and every parameter after the steps, per tensor."""
    from nemotron.models.nano3 import Nano3Config
    from nemotron.models.nano3.model import Nano3ForCausalLM
    from nemotron.train.fp8 import Fp8Config, apply_fp8
    from nemotron.train.loop import train_step

    cfg = Nano3Config(
        hybrid_pattern="E*E", num_layers=3, hidden_size=32, vocab_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, mamba_state_size=8,
        mamba_num_groups=2, mamba_conv_kernel=4, mamba_chunk_size=4, num_experts=8, moe_top_k=2,
        moe_ffn_hidden_size=32, moe_shared_expert_hidden_size=16, ffn_hidden_size=16,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    batches = [
        {"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(2, 16)}
        for t in torch.randint(0, 64, (2, 2, 17), generator=gen)
    ]
    cpu = torch.device("cpu")

    def run(gemm: str):
        torch.manual_seed(0)
        model = Nano3ForCausalLM(cfg)
        fp8 = Fp8Config(
            enabled=True,
            layers=["experts"],
            experts_weight_grad="fp8",
            experts_grouped_gemm=gemm,
            experts_grouped_tiles=[64, 16, 32, 2, 4, 1, 0] if gemm == "triton" else None,
        )
        summary = apply_fp8(model, fp8, cpu)
        assert len(summary.experts) == 2 and len(summary.fp8_dispatch) == 2, summary
        layer = model.backbone.layers["0"].mixer.experts
        assert layer.emulate == (gemm == "cutlass") and f"{gemm} products" in repr(layer), repr(layer)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = [
            train_step(model, opt, batches, device=cpu, precision="bf16", grad_clip=1.0).loss
            for _ in range(2)
        ]
        return losses, dict(model.named_parameters())

    want_losses, want = run("cutlass")
    with _bf16_rounded_to_nearest():
        got_losses, got = run("triton")
    assert want_losses[0] != want_losses[1]
    for a, b in zip(got_losses, want_losses):
        assert abs(a - b) < 1e-3 * abs(b), (got_losses, want_losses)
    for name, p in want.items():
        diff = float((got[name].detach().double() - p.detach().double()).norm() / p.detach().double().norm())
        assert diff < 1e-3, f"{name}: relative difference {diff:.2e}"


def _fp8_relu2_backward_check():
    """The one-pass squared-ReLU backward == `relu2_backward_rows`: per-row FP8 forms of h and
    dh_pre, bit for bit. Values whose products are exact in BF16 (the interpreter's BF16 and
    float8 roundings are not IEEE), a row with no positive h_pre (all zero), a ragged count of
    rows per program."""
    from nemotron.kernels.fp8 import relu2_backward_rows
    from nemotron.kernels.fp8_triton import relu2_backward_rows_triton

    gen = torch.Generator().manual_seed(12)
    h_pre = (torch.randint(-16, 16, (37, 200), generator=gen) / 8).bfloat16()
    grad = (torch.randint(-8, 8, (37, 200), generator=gen) / 1024).bfloat16()
    h_pre[3] = -1
    want = relu2_backward_rows(h_pre, grad)
    got = relu2_backward_rows_triton(h_pre, grad, out_dtype=torch.float32)
    for name, g, w in zip(("h", "h_inv", "dh_pre", "dh_inv"), got, want):
        if w.dtype == torch.float32:
            assert torch.equal(g, w), name
        else:
            assert torch.equal(g.to(w.dtype).view(torch.uint8), w.view(torch.uint8)), name
    assert torch.all(got[0][3] == 0) and torch.all(got[2][3] == 0)


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


def _graph_nodes(fn, limit=4):
    """The autograd nodes within `limit` steps of fn."""
    seen, frontier = [], [fn]
    for _ in range(limit):
        frontier = [n for f in frontier for n, _ in f.next_functions if n is not None]
        seen += frontier
    return seen


def _mamba_chain_check(seq, batch=2, with_autocast=False):
    """The mixer with the fused chain (forced on CPU tensors) against the mixer's reference path:
    output and the gradients of the input and of every parameter."""
    import nemotron.kernels.mamba_chain as chain
    from nemotron.kernels import fast_paths
    from nemotron.kernels.conv1d_triton import CONV1D_TRITON_CONFIG
    from nemotron.kernels.ssd_triton import SSD_TRITON_CONFIG
    from nemotron.models.nano3 import Mamba2Mixer, Nano3Config

    SSD_TRITON_CONFIG["block_rows"] = 16
    CONV1D_TRITON_CONFIG.update(block_t=16, block_c=32)
    cfg = Nano3Config(
        hybrid_pattern="M",
        num_layers=1,
        hidden_size=24,
        vocab_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        mamba_num_heads=4,
        mamba_head_dim=16,
        mamba_state_size=16,
        mamba_num_groups=2,
        mamba_conv_kernel=4,
        mamba_chunk_size=16,
        num_experts=2,
        moe_top_k=1,
        moe_ffn_hidden_size=8,
        moe_shared_expert_hidden_size=8,
        ffn_hidden_size=8,
    )
    torch.manual_seed(7)
    m = Mamba2Mixer(cfg)
    with torch.no_grad():  # parameters away from their initial constants, so every gradient counts
        m.D.uniform_(0.5, 1.5)
        m.norm.weight.uniform_(0.5, 1.5)
        m.conv1d.bias.uniform_(-0.5, 0.5)
        m.in_proj.weight.mul_(10.0)
    gen = torch.Generator().manual_seed(8)
    u = torch.randn(batch, seq, cfg.hidden_size, generator=gen)
    gy = torch.randn(batch, seq, cfg.hidden_size, generator=gen)

    def run(forced):
        m.zero_grad(set_to_none=True)
        uu = u.clone().requires_grad_(True)
        original = chain.chain_supported
        if forced:
            chain.chain_supported = lambda *a: True
        try:
            with fast_paths(forced):
                out = m(uu)
        finally:
            chain.chain_supported = original
        fused = any("MambaChainFunction" in type(n).__name__ for n in _graph_nodes(out.grad_fn))
        assert fused == forced, f"fused chain ran: {fused}, forced: {forced}"
        (out * gy).sum().backward()
        return {"out": out, "du": uu.grad, **{n: p.grad for n, p in m.named_parameters()}}

    got, want = run(True), run(False)
    assert set(got) == set(want)
    for name in want:
        assert got[name] is not None, name
        torch.testing.assert_close(
            got[name], want[name], rtol=1e-4, atol=1e-4, msg=lambda msg, n=name: f"{n}: {msg}"
        )


def _mamba_chain_direct_check(dt_limit, seq=40):
    """mamba_chain_triton against mamba_chain_reference with a dt clamp that bites and dt_bias
    values on both softplus thresholds (> 20: identity; < -15: exp)."""
    from nemotron.kernels.conv1d_triton import CONV1D_TRITON_CONFIG
    from nemotron.kernels.mamba_chain import MambaChainShape, mamba_chain_reference
    from nemotron.kernels.mamba_chain_triton import mamba_chain_triton
    from nemotron.kernels.ssd_triton import SSD_TRITON_CONFIG

    SSD_TRITON_CONFIG["block_rows"] = 16
    CONV1D_TRITON_CONFIG.update(block_t=16, block_c=32)
    shape = MambaChainShape(
        num_heads=6, head_dim=16, num_groups=3, state_size=16, chunk_size=16, eps=1e-5, dt_limit=dt_limit
    )
    gen = torch.Generator().manual_seed(9)
    # The gate z read from a wider buffer: zxbcdt itself a row-strided slice.
    wide = torch.randn(2, seq, shape.in_proj_dim + 6, generator=gen)
    zxbcdt = wide[..., 2 : 2 + shape.in_proj_dim]
    leaves = dict(
        zxbcdt=zxbcdt,
        conv_weight=torch.randn(shape.conv_dim, 1, 4, generator=gen) * 0.5,
        conv_bias=torch.randn(shape.conv_dim, generator=gen) * 0.3,
        dt_bias=torch.tensor([-1.0, -3.0, 0.5, 22.0, -18.0, -2.0]),
        # head 3 (dt ~ 22 unclamped): a small |A| keeps its decays in a realistic range
        A_log=torch.rand(6, generator=gen) - 6.0 * (torch.arange(6) == 3),
        D=torch.rand(6, generator=gen) + 0.5,
        norm_weight=torch.rand(shape.d_inner, generator=gen) + 0.5,
    )
    gy = torch.randn(2, seq, shape.d_inner, generator=gen)

    def run(fn):
        ls = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
        out = fn(**ls, shape=shape)
        (out * gy).sum().backward()
        return {"out": out, **{k: v.grad for k, v in ls.items()}}

    got, want = run(mamba_chain_triton), run(mamba_chain_reference)
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


def _mamba_chain_dt_check():
    """The chain's dt kernel, dt = softplus(raw + dt_bias) and cumsum(dt * A) per chunk, against
    float64 per value, relative error at float32 rounding over the whole softplus range (its
    log(1 + e) was 14% off at raw + bias = -14, 0.7% at -10, 1e-4 at -6: Megatron's initial
    dt of 1e-3..0.1 is softplus of -6.9..-2.25); two rows of a batch with different values, a
    ragged last chunk."""
    from nemotron.kernels.mamba_chain import MambaChainShape
    from nemotron.kernels.mamba_chain_triton import _dt_forward

    pre = torch.cat([torch.linspace(-15.0, 20.0, 700), torch.tensor([-2.7726, -2.7725, 20.0001, 25.0])])
    heads, seq = 5, pre.numel() // 5 + 1
    raw = torch.zeros(2, seq, heads)
    raw.view(2, -1)[0, : pre.numel()] = pre
    raw.view(2, -1)[1, : pre.numel()] = pre.flip(0)
    bias = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0])
    raw = raw - bias  # raw + bias is `pre` (to float32 rounding)
    a_log = torch.tensor([0.0, 1.0, 2.0, 2.7, 0.5])
    shape = MambaChainShape(num_heads=heads, head_dim=1, num_groups=1, state_size=1, chunk_size=16, eps=1e-5)
    dt, acs = _dt_forward(raw, bias, a_log, shape)
    want = torch.nn.functional.softplus(raw.double() + bias.double()).transpose(1, 2)  # [b, h, seq]
    got = dt[:, :, :seq].double()
    rel = ((got - want).abs() / want).max()
    assert rel < 1e-6, f"dt: relative error {float(rel):.2e}"
    assert torch.all(dt[:, :, seq:] == 0)
    a = -torch.exp(a_log.double())
    steps = torch.nn.functional.pad(want * a[None, :, None], (0, dt.shape[-1] - seq))
    want_acs = steps.view(2, heads, -1, 16).cumsum(-1).view(2, heads, -1)
    torch.testing.assert_close(acs.double(), want_acs, rtol=1e-5, atol=1e-5)


def _mamba_chain_nan_dt_check():
    """A NaN dt_raw (a diverged in-projection) in one (batch row, step, head): the chain's output
    and every gradient have NaN exactly where the reference's have, the rest equal at fp32
    tolerance, per tensor (the dt kernel's clamp and softplus dropped the NaN: dt became 20,
    and the output and every parameter gradient came out finite)."""
    from nemotron.kernels.conv1d_triton import CONV1D_TRITON_CONFIG
    from nemotron.kernels.mamba_chain import MambaChainShape, mamba_chain_reference
    from nemotron.kernels.mamba_chain_triton import mamba_chain_triton
    from nemotron.kernels.ssd_triton import SSD_TRITON_CONFIG

    SSD_TRITON_CONFIG["block_rows"] = 16
    CONV1D_TRITON_CONFIG.update(block_t=16, block_c=32)
    shape = MambaChainShape(num_heads=4, head_dim=8, num_groups=2, state_size=6, chunk_size=16, eps=1e-5)
    gen = torch.Generator().manual_seed(16)
    leaves = dict(
        zxbcdt=torch.randn(2, 20, shape.in_proj_dim, generator=gen),
        conv_weight=torch.randn(shape.conv_dim, 1, 4, generator=gen) * 0.5,
        conv_bias=torch.randn(shape.conv_dim, generator=gen) * 0.3,
        dt_bias=torch.randn(4, generator=gen) - 2.0,
        A_log=torch.log(torch.empty(4).uniform_(1, 16, generator=gen)),
        D=torch.rand(4, generator=gen) + 0.5,
        norm_weight=torch.rand(shape.d_inner, generator=gen) + 0.5,
    )
    leaves["zxbcdt"][1, 7, shape.d_inner + shape.conv_dim + 2] = float("nan")  # row 1, step 7, head 2
    gy = torch.randn(2, 20, shape.d_inner, generator=gen)

    def run(fn):
        ls = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
        out = fn(**ls, shape=shape)
        (out * gy).sum().backward()
        return {"out": out, **{k: v.grad for k, v in ls.items()}}

    got, want = run(mamba_chain_triton), run(mamba_chain_reference)
    assert want["out"][1, 7:].isnan().any() and not want["out"][0].isnan().any()
    for name in want:
        assert torch.equal(got[name].isnan(), want[name].isnan()), (
            f"{name}: {int(got[name].isnan().sum())} NaN, the reference {int(want[name].isnan().sum())}"
        )
        torch.testing.assert_close(
            got[name], want[name], rtol=1e-4, atol=1e-4, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}"
        )


def _mamba_chain_half_check():
    """The chain in float16 (the interpreter has no bfloat16; float16 exercises the same
    low-precision loads, stores and gradient dtypes) against a float64 reference run."""
    from nemotron.kernels.mamba_chain import MambaChainShape, mamba_chain_reference
    from nemotron.kernels.mamba_chain_triton import mamba_chain_triton
    from nemotron.kernels.ssd_triton import SSD_TRITON_CONFIG

    SSD_TRITON_CONFIG["block_rows"] = 16
    shape = MambaChainShape(num_heads=4, head_dim=16, num_groups=2, state_size=16, chunk_size=16, eps=1e-5)
    gen = torch.Generator().manual_seed(10)
    leaves = dict(
        zxbcdt=torch.randn(2, 40, shape.in_proj_dim, generator=gen),
        conv_weight=torch.randn(shape.conv_dim, 1, 4, generator=gen) * 0.5,
        conv_bias=torch.randn(shape.conv_dim, generator=gen) * 0.3,
        dt_bias=torch.randn(4, generator=gen) - 1,
        A_log=torch.rand(4, generator=gen),
        D=torch.rand(4, generator=gen) + 0.5,
        norm_weight=torch.rand(shape.d_inner, generator=gen) + 0.5,
    )
    gy = torch.randn(2, 40, shape.d_inner, generator=gen, dtype=torch.float64)

    def run(fn, dtype):
        ls = {k: v.to(dtype).requires_grad_(True) for k, v in leaves.items()}
        out = fn(**ls, shape=shape)
        (out.double() * gy).sum().backward()
        return {"out": out, **{k: v.grad for k, v in ls.items()}}

    got, want = run(mamba_chain_triton, torch.float16), run(mamba_chain_reference, torch.float64)
    for name in want:
        assert got[name].dtype == torch.float16, (name, got[name].dtype)
        err = ((got[name].double() - want[name]).norm() / want[name].norm()).item()
        assert err < 1e-2, (name, err)


def _mamba_chain_no_glue_check(fused=True):
    """With the fused chain, one mixer forward+backward runs no PyTorch op on an activation-sized
    tensor other than the projections' matmuls (and views / allocations): every copy, cast,
    concatenation, elementwise op and reduction of the step-by-step path is gone. (Ops inside
    the Triton kernels, which the interpreter runs with numpy/torch, are not counted.)"""
    import triton.runtime.interpreter as interpreter
    from torch.utils._python_dispatch import TorchDispatchMode

    import nemotron.kernels.mamba_chain as chain
    from nemotron.models.nano3 import Mamba2Mixer, Nano3Config

    cfg = Nano3Config(
        hybrid_pattern="M",
        num_layers=1,
        hidden_size=24,
        vocab_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        mamba_num_heads=4,
        mamba_head_dim=16,
        mamba_state_size=16,
        mamba_num_groups=2,
        mamba_chunk_size=16,
        num_experts=2,
        moe_top_k=1,
        moe_ffn_hidden_size=8,
        moe_shared_expert_hidden_size=8,
        ffn_hidden_size=8,
    )
    m = Mamba2Mixer(cfg)
    seq = 64
    big = seq * m.d_inner  # elements of one [seq, d_inner] activation
    allowed = {
        "mm",
        "empty",
        "empty_strided",
        "empty_like",
        "new_empty",
        "new_empty_strided",
        "view",
        "_unsafe_view",
        "_reshape_alias",
        "slice",
        "t",
        "transpose",
        "as_strided",
        "detach",
        "alias",
        "expand",
        "unsqueeze",
        "squeeze",
        "split_with_sizes",
        "split",
        "permute",
    }
    inside, glue = [0], []
    run = interpreter.InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        inside[0] += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            inside[0] -= 1

    class Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [
                t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)
            ]
            if not inside[0] and name not in allowed and any(t.numel() >= big for t in tensors):
                glue.append(f"{func}{[tuple(t.shape) for t in tensors]}")
            return out

    import nemotron.kernels.conv1d as conv_module
    import nemotron.kernels.rmsnorm as norm_module
    import nemotron.kernels.ssd as ssd_module

    patched = [
        (chain, "chain_supported", lambda *a: fused),
        # the step-by-step fast path on CPU tensors (its dispatchers test is_cuda)
        (ssd_module, "triton_supports", lambda x, c: True),
        (conv_module, "_use_triton", lambda x: True),
        (norm_module, "_use_triton", lambda x: True),
    ]
    originals = [(mod, name, getattr(mod, name)) for mod, name, _ in patched]
    u = torch.randn(1, seq, cfg.hidden_size, requires_grad=True)
    gy = torch.randn(1, seq, cfg.hidden_size)
    try:
        for mod, name, value in patched:
            setattr(mod, name, value)
        interpreter.InterpretedFunction.run = counted_run
        with Census():
            m(u).backward(gy)
    finally:
        interpreter.InterpretedFunction.run = run
        for mod, name, value in originals:
            setattr(mod, name, value)
    if fused:
        assert not glue, glue
    else:  # the census sees the step-by-step path's glue (so it would see a regression)
        assert any("cat" in g for g in glue) and any("clone" in g for g in glue), glue


def _route_topk_check(tokens=37, experts=20, k=6, block_t=8, grads=("scores", "weights")):
    """Fused routing == the reference: same experts in the same order, scores, weights, and the
    logits' gradient from the scores' (balance loss) and/or the weights' (combine) gradients."""
    from nemotron.kernels.moe_router import route_topk_reference, route_topk_triton
    from nemotron.kernels.moe_router_triton import ROUTER_TRITON_CONFIG

    ROUTER_TRITON_CONFIG["block_t"] = block_t  # several token tiles and a ragged last one
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(tokens, experts, generator=gen) * 2
    bias = torch.randn(experts, generator=gen) * 0.3  # changes which experts win
    g_scores = torch.randn(tokens, experts, generator=gen)
    g_weights = torch.randn(tokens, k, generator=gen)

    def run(fn):
        leaf = logits.clone().requires_grad_(True)
        scores, idx, weights = fn(leaf, bias, k, 2.5)
        loss = 0
        if "scores" in grads:
            loss = loss + (scores * g_scores).sum()
        if "weights" in grads:
            loss = loss + (weights * g_weights).sum()
        loss.backward()
        return scores, idx, weights, leaf.grad

    got, want = run(route_topk_triton), run(route_topk_reference)
    assert torch.equal(got[1], want[1]), "expert indices differ"
    assert not torch.equal(want[1], torch.topk(logits, k).indices), "the bias should matter here"
    for i, name in [(0, "scores"), (2, "weights"), (3, "dlogits")]:
        torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def _route_topk_ties_check():
    """Ties in the biased scores (equal router rows, scores saturated at 1.0 in float32, an
    all-equal row) and NaN logits (a diverged step): the Triton kernel and the reference take the
    same experts in the same order, the lower expert index first among equal scores, NaN scores
    first with NaN weights (the kernel took expert id 8 of 8 for an all-NaN row, and skipped a
    NaN expert with finite weights)."""
    from nemotron.kernels.moe_router import route_topk_reference, route_topk_triton
    from nemotron.kernels.moe_router_triton import ROUTER_TRITON_CONFIG

    ROUTER_TRITON_CONFIG["block_t"] = 4
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(6, 8, generator=gen)
    logits[:, 5] = logits[:, 2]  # experts 2 and 5 tie on every token
    logits[1, [1, 4, 6]] = 40.0  # three scores of exactly 1.0
    logits[2] = 0.0  # all eight tie
    bias = torch.zeros(8)
    bias[[2, 5]] = 5.0  # 2 and 5 always lead, tied
    for k in (1, 3, 8):
        got, want = route_topk_triton(logits, bias, k, 2.5), route_topk_reference(logits, bias, k, 2.5)
        assert torch.equal(got[1], want[1]), f"k={k}: {got[1].tolist()} != {want[1].tolist()}"
        assert (want[1][:, 0] == 2).all(), want[1].tolist()
        torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-6)
    logits[3, 6] = float("nan")
    logits[4] = float("nan")
    got, want = route_topk_triton(logits, bias, 3, 2.5), route_topk_reference(logits, bias, 3, 2.5)
    assert torch.equal(got[1], want[1]), f"NaN: {got[1].tolist()} != {want[1].tolist()}"
    assert want[1][3].tolist() == [6, 2, 5] and want[1][4].tolist() == [0, 1, 2], want[1].tolist()
    torch.testing.assert_close(got[2], want[2], rtol=1e-6, atol=1e-6, equal_nan=True)
    assert got[2][[3, 4]].isnan().all() and not got[2][[0, 1, 2, 5]].isnan().any()


def _route_topk_switched_off_check():
    """Experts switched off by a -inf bias, fewer left than k on some rows: the Triton kernel
    takes the reference's experts (the finite ones by score, then the -inf ones by index),
    each once (it took expert 0 k times: a chosen column marked -inf tied with the switched-off
    ones), with the same weights and logit gradients."""
    from nemotron.kernels.moe_router import route_topk_reference, route_topk_triton
    from nemotron.kernels.moe_router_triton import ROUTER_TRITON_CONFIG

    ROUTER_TRITON_CONFIG["block_t"] = 4
    gen = torch.Generator().manual_seed(14)
    logits = torch.randn(5, 6, generator=gen)
    g_weights = torch.randn(5, 3, generator=gen)
    for off in ([1, 2, 3, 4, 5], [0, 2, 3, 5], [4]):
        bias = torch.zeros(6)
        bias[off] = float("-inf")
        outs = []
        for fn in (route_topk_triton, route_topk_reference):
            leaf = logits.clone().requires_grad_(True)
            _, idx, weights = fn(leaf, bias, 3, 2.5)
            (weights * g_weights).sum().backward()
            outs.append((idx, weights, leaf.grad))
        (idx, w, g), (want_idx, want_w, want_g) = outs
        assert torch.equal(idx, want_idx), f"off {off}: {idx.tolist()} != {want_idx.tolist()}"
        assert all(len(set(row)) == 3 for row in idx.tolist()), idx.tolist()
        torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g, want_g, rtol=1e-5, atol=1e-6)


def _route_topk_megatron_check():
    """The Triton routing on Megatron-Core's cases (tests/models/fixtures/megatron_router.json:
    recipe width, a bias that flips the top k, one expert taking every token, top k = E, top 1,
    ties): the reference's experts in the reference's order, and Megatron's own chosen experts,
    combine weights and their logit gradient where those are defined the same way (float32, no
    ties, top k > 1), per case."""
    from nemotron.kernels.moe_router import route_topk_reference, route_topk_triton
    from nemotron.kernels.moe_router_triton import ROUTER_TRITON_CONFIG

    ROUTER_TRITON_CONFIG["block_t"] = 4  # several token tiles and a ragged last one
    path = Path(__file__).resolve().parent.parent / "models" / "fixtures" / "megatron_router.json"
    for case in json.loads(path.read_text())["cases"]:
        if case["dtype"] != "float32":
            continue  # the kernel takes float32 logits only
        name, e, k, scale = case["name"], case["experts"], case["top_k"], case["scale"]
        logits = torch.tensor(case["logits"]).view(-1, e)
        bias = torch.tensor(case["bias"])
        upstream = torch.tensor(case["upstream"]).view(-1, e)
        outs = []
        for fn in (route_topk_triton, route_topk_reference):
            leaf = logits.clone().requires_grad_(True)
            scores, idx, weights = fn(leaf, bias, k, scale)
            (weights * upstream.gather(1, idx)).sum().backward()
            outs.append((scores.detach(), idx, weights.detach(), leaf.grad))
        (s, idx, w, g), (want_s, want_idx, want_w, want_g) = outs
        assert torch.equal(idx, want_idx), f"{name}: {idx.tolist()} != {want_idx.tolist()}"
        for got, want, what in ((s, want_s, "scores"), (w, want_w, "weights"), (g, want_g, "dlogits")):
            torch.testing.assert_close(
                got, want, rtol=1e-5, atol=1e-7, msg=lambda m, n=name, x=what: f"{n}: {x}: {m}"
            )
        if name in ("ties in the scores", "top 1"):
            continue  # Megatron's tie order and its unnormalised top 1 (tests/models/test_megatron_router.py)
        theirs = case["megatron"]
        dense = torch.zeros(idx.shape[0], e).scatter(1, idx, w)
        assert torch.equal(dense != 0, torch.tensor(theirs["map"]).bool()), f"{name}: chosen experts"
        torch.testing.assert_close(dense, torch.tensor(theirs["probs"]), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g, torch.tensor(theirs["grad_probs"]), rtol=1e-5, atol=1e-7)


def _moe_block_check(num_experts=4, top_k=4, starve=None, seq=5):
    """The whole MoE block with its Triton kernels forced on CPU tensors (routing, combine with the
    shared output, squared ReLU, the fan-out's gradient sum) against its reference path
    (`fast_paths(False)`): output, input gradient and every parameter's gradient, per tensor;
    `starve`: an expert biased out of every token's choice (its gradients exactly zero)."""
    import nemotron.kernels.add_n as add_n_module
    import nemotron.kernels.moe_combine as combine_module
    import nemotron.kernels.moe_router as router_module
    import nemotron.kernels.relu2 as relu2_module
    from nemotron.kernels import fast_paths
    from nemotron.models.nano3 import MoE, Nano3Config

    cfg = Nano3Config(
        hybrid_pattern="E",
        num_layers=1,
        hidden_size=24,
        vocab_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=num_experts,
        moe_top_k=top_k,
        moe_ffn_hidden_size=16,
        moe_shared_expert_hidden_size=8,
        ffn_hidden_size=8,
        init_std=0.3,
    )
    torch.manual_seed(14)
    moe = MoE(cfg)
    if starve is not None:
        with torch.no_grad():
            moe.router.expert_bias[starve] = -10.0
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(2, seq, cfg.hidden_size, generator=gen)
    gy = torch.randn(2, seq, cfg.hidden_size, generator=gen)
    forced = [
        (router_module, "use_triton"),
        (combine_module, "_use_triton"),
        (relu2_module, "_use_triton"),
        (add_n_module, "_use_triton"),
    ]
    originals = [getattr(mod, name) for mod, name in forced]

    def run(fast):
        moe.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        try:
            if fast:
                for mod, name in forced:
                    setattr(mod, name, lambda *a: True)
            with fast_paths(fast):
                y, aux = moe(xx)
                ((y * gy).sum() + 0.7 * aux).backward()
        finally:
            for (mod, name), value in zip(forced, originals):
                setattr(mod, name, value)
        return {"out": y, "aux": aux, "dx": xx.grad, **{n: p.grad for n, p in moe.named_parameters()}}

    got, want = run(True), run(False)
    for name in want:
        assert got[name] is not None, name
        torch.testing.assert_close(
            got[name], want[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
        )
    if starve is not None:
        assert got["experts.up_proj"][starve].abs().max() == 0
        assert got["experts.down_proj"][starve].abs().max() == 0


def _model_mixer_grads(seq, chunk, heads, head_dim, state, groups, seed=0):
    """A real mixer's chain input and output gradient: a two-Mamba-block model (the released
    initialisation: dt log-uniform in [1e-3, 0.1], A = -U(1, 16)) in float64, next-token loss on
    random tokens. Returns (mixer, zxbcdt, d(chain output)) of the first block. The decay
    gradient's terms cancel across a chunk in this regime (they do not for random dy)."""
    from nemotron.models.nano3 import Nano3Config, Nano3ForCausalLM

    cfg = Nano3Config(
        hybrid_pattern="MM",
        num_layers=2,
        hidden_size=4 * heads * head_dim // 2,
        vocab_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        mamba_num_heads=heads,
        mamba_head_dim=head_dim,
        mamba_state_size=state,
        mamba_num_groups=groups,
        mamba_conv_kernel=4,
        mamba_chunk_size=chunk,
        num_experts=2,
        moe_top_k=1,
        moe_ffn_hidden_size=8,
        moe_shared_expert_hidden_size=8,
        ffn_hidden_size=8,
        init_std=0.02,
    )
    torch.manual_seed(seed)
    model = Nano3ForCausalLM(cfg).double()
    mixer = model.backbone.layers["0"].mixer
    seen = {}
    mixer.in_proj.register_forward_hook(lambda mod, inp, out: seen.setdefault("zxbcdt", out))

    def keep_output_grad(module, inputs):
        inputs[0].register_hook(lambda g: seen.setdefault("dout", g))

    mixer.out_proj.register_forward_pre_hook(keep_output_grad)
    ids = torch.randint(0, cfg.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(seed))
    model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    # Scaled by a power of two to order 1, as a float16 loss scaler would: float16's range (not its
    # precision) would otherwise flush these small gradients; bfloat16 has float32's range.
    dout = seen["dout"].detach()
    return mixer, seen["zxbcdt"].detach(), dout * 2.0 ** -torch.floor(torch.log2(dout.abs().max()))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _decay_grads_check(path, seq=128, chunk=32, heads=4, head_dim=16, state=16, groups=2):
    """Issue 16's regression: per tensor, the Triton path's gradient error in float16 (the
    interpreter has no bfloat16) against float64 must stay within 1.5x the error of the PyTorch
    reference run in float32 on the same float16-rounded inputs (or 1e-3, the float16 scale of the
    audit's 1e-2 bf16 floor). ``path`` "ssd": the bare scan on the mixer's real x, dt, A, B, C and
    output gradient; "chain": the fused chain, every parameter and the input gradient."""
    import torch.nn.functional as F

    from nemotron.kernels.conv1d import causal_conv1d_reference
    from nemotron.kernels.mamba_chain import mamba_chain_reference
    from nemotron.kernels.mamba_chain_triton import mamba_chain_triton
    from nemotron.kernels.rmsnorm import gated_rmsnorm_reference
    from nemotron.kernels.ssd import ssd_chunked_reference
    from nemotron.kernels.ssd_triton import SSD_TRITON_CONFIG, ssd_triton

    SSD_TRITON_CONFIG["block_rows"] = 16  # several row blocks per chunk
    mixer, zxbcdt, dout = _model_mixer_grads(seq, chunk, heads, head_dim, state, groups)
    shape = mixer.chain_shape
    params = dict(
        conv_weight=mixer.conv1d.weight,
        conv_bias=mixer.conv1d.bias,
        dt_bias=mixer.dt_bias,
        A_log=mixer.A_log,
        D=mixer.D,
        norm_weight=mixer.norm.weight,
    )
    if path == "chain":
        leaves = dict(zxbcdt=zxbcdt, **{k: v.detach() for k, v in params.items()})

        def run(fn, act, cd):
            ls = {
                k: v.to(act if k == "zxbcdt" else cd).clone().requires_grad_(True) for k, v in leaves.items()
            }
            # The reference in low precision runs as the model's reference path does: under
            # autocast (the conv in float16 from float32 parameters).
            low = fn is mamba_chain_reference and act != torch.float64
            with torch.autocast("cpu", dtype=act, enabled=low):
                out = fn(**ls, shape=shape)
            (out.double() * dout.to(act).double()).sum().backward()
            return {k: v.grad for k, v in ls.items()}
    else:
        b, s, _ = zxbcdt.shape
        di, gn = shape.d_inner, shape.num_groups * shape.state_size
        with torch.no_grad():
            z, xbc, dt_raw = torch.split(zxbcdt, [di, shape.conv_dim, shape.num_heads], dim=-1)
            xbc = causal_conv1d_reference(xbc, mixer.conv1d.weight, mixer.conv1d.bias, "silu")
            x, B, C = torch.split(xbc, [di, gn, gn], dim=-1)
            dt = F.softplus(dt_raw + mixer.dt_bias)
            A = -torch.exp(mixer.A_log)
        y = ssd_chunked_reference(
            x.reshape(b, s, heads, head_dim),
            dt,
            A,
            B.reshape(b, s, groups, state),
            C.reshape(b, s, groups, state),
            chunk,
        )[0]
        y = y.detach().requires_grad_(True)
        out = gated_rmsnorm_reference(
            (y + x.reshape(y.shape) * mixer.D[:, None]).reshape(b, s, di),
            z,
            mixer.norm.weight,
            di // groups,
            shape.eps,
        )
        (out * dout).sum().backward()
        dy = y.grad
        leaves = dict(
            x=x.reshape(y.shape),
            dt=dt,
            A=A,
            B=B.reshape(b, s, groups, state),
            C=C.reshape(b, s, groups, state),
        )

        def run(fn, act, cd):
            ls = {
                k: v.to(cd if k in ("dt", "A") else act).clone().requires_grad_(True)
                for k, v in leaves.items()
            }
            yy = fn(ls["x"], ls["dt"], ls["A"], ls["B"], ls["C"], chunk)[0]
            (yy.double() * dy.to(act).double()).sum().backward()
            return {k: v.grad for k, v in ls.items()}

    fast = mamba_chain_triton if path == "chain" else ssd_triton
    slow = mamba_chain_reference if path == "chain" else ssd_chunked_reference
    truth = run(slow, torch.float64, torch.float64)
    ref = run(slow, torch.float16, torch.float32)
    got = run(fast, torch.float16, torch.float32)
    bad = []
    for k in truth:
        e_ref, e_got = _rel(ref[k], truth[k]), _rel(got[k], truth[k])
        if e_got > max(1.5 * e_ref, 1e-3):
            bad.append(f"{k}: fast {e_got:.2e} vs reference {e_ref:.2e}")
    assert not bad, f"{path} gradients worse than the reference's in float16: " + "; ".join(bad)


CHECKS = {
    "route_topk_scores_and_weights_grads": _route_topk_check,
    "route_topk_weights_grad_only_nano3_width": lambda: _route_topk_check(
        tokens=9, experts=128, k=6, block_t=16, grads=("weights",)
    ),
    "route_topk_scores_grad_only_k1": lambda: _route_topk_check(experts=5, k=1, grads=("scores",)),
    "route_topk_ties": _route_topk_ties_check,
    "route_topk_experts_switched_off": _route_topk_switched_off_check,
    "route_topk_megatron_cases": _route_topk_megatron_check,
    "moe_block_top_k_all_experts": _moe_block_check,
    "moe_block_starved_expert_seq1": lambda: _moe_block_check(num_experts=6, top_k=2, starve=3, seq=1),
    "mamba_chain_no_activation_glue": _mamba_chain_no_glue_check,
    "mamba_stepwise_glue_is_seen": lambda: _mamba_chain_no_glue_check(fused=False),
    "mamba_chain_float16": _mamba_chain_half_check,
    "mamba_chain_dt_softplus": _mamba_chain_dt_check,
    "mamba_chain_nan_dt_raw": _mamba_chain_nan_dt_check,
    "mamba_chain_direct_clamped": lambda: _mamba_chain_direct_check((0.05, 2.0)),
    "mamba_chain_direct_unclamped": lambda: _mamba_chain_direct_check((0.0, float("inf")), seq=16),
    "mamba_chain_ragged": lambda: _mamba_chain_check(seq=37),
    "mamba_chain_one_chunk_batch1": lambda: _mamba_chain_check(seq=16, batch=1),
    "mamba_chain_shorter_than_a_chunk": lambda: _mamba_chain_check(seq=5),
    "mamba_chain_seq1": lambda: _mamba_chain_check(seq=1),
    "gated_rmsnorm_strided_gate": lambda: _rmsnorm_check(gated=True, strided_gate=True),
    "add_n_three_mixed_dtypes": lambda: _add_n_check(True),
    "add_n_two": lambda: _add_n_check(False),
    "fp8_rows_ragged_programs": lambda: _fp8_rows_check((150, 77), relu2=False),
    "fp8_rows_nano3_width": lambda: _fp8_rows_check((5, 2688), relu2=False),
    "fp8_rows_relu2_3d": lambda: _fp8_rows_check((3, 5, 300), relu2=True),
    "fp8_transposed_forms": _fp8_transposed_check,
    "fp8_transposed_forms_small_tiles": lambda: _fp8_transposed_check((2, 70, 50), tile=(16, 32, 4)),
    "fp8_transposed_groups": lambda: _fp8_transposed_groups_check([5, 0, 130, 17, 1, 300]),
    "fp8_transposed_groups_one_expert": lambda: _fp8_transposed_groups_check([64]),
    "fp8_transposed_groups_trailing_empty": lambda: _fp8_transposed_groups_check([3, 250, 0, 0]),
    "fp8_transposed_groups_nan": _fp8_transposed_groups_nan_check,
    "expert_weight_grad_float32": lambda: _expert_weight_grad_check(
        [5, 0, 130, 17, 1, 300], (32, 16, 16, 4, 2)
    ),
    "expert_weight_grad_float32_whole_tiles": lambda: _expert_weight_grad_check(
        [64, 0, 32], (16, 8, 32, 4, 1), 32, 16
    ),
    "fp8_grouped_weight_grad": lambda: _fp8_grouped_weight_grad_check([5, 0, 130, 17, 1, 300], 32),
    "fp8_grouped_weight_grad_whole_groups": lambda: _fp8_grouped_weight_grad_check([3, 250, 0], 128),
    "fp8_relu2_backward_rows": _fp8_relu2_backward_check,
    "fp8_grouped_mm_tma": lambda: _fp8_grouped_mm_check([5, 0, 130, 17, 1, 300], use_tma=True),
    "fp8_grouped_mm_pointers": lambda: _fp8_grouped_mm_check([5, 0, 130, 17, 1, 300], use_tma=False),
    "fp8_grouped_mm_trailing_empty": lambda: _fp8_grouped_mm_check([3, 64, 0, 0], use_tma=True),
    "fp8_grouped_mm_persistent": lambda: _fp8_grouped_mm_check(
        [5, 0, 130, 17, 1, 300], use_tma=True, persistent=True
    ),
    "fp8_grouped_mm_persistent_pointers": lambda: _fp8_grouped_mm_check(
        [3, 64, 0, 0], use_tma=False, persistent=True
    ),
    "fp8_grouped_mm_tiles": _fp8_grouped_mm_tiles_check,
    "fp8_expert_mlp_triton_bf16_wgrad": lambda: _fp8_expert_mlp_triton_check(
        "bf16", [64, 16, 32, 2, 4, 1, 0]
    ),
    "fp8_expert_mlp_triton_fp8_wgrad_exact_accum": lambda: _fp8_expert_mlp_triton_check(
        "fp8", [64, 32, 32, 3, 4, 1, 0], fast_accum=False
    ),
    "fp8_expert_mlp_triton_fp8_rows_persistent_pointers": lambda: _fp8_expert_mlp_triton_check(
        "fp8", [64, 16, 64, 2, 4, 0, 1], fp8_rows=True
    ),
    "fp8_expert_mlp_triton_gathered_default_tiles": lambda: _fp8_expert_mlp_triton_check(
        "fp8", None, gathered=True
    ),
    "fp8_expert_mlp_triton_gathered_bf16_wgrad": lambda: _fp8_expert_mlp_triton_check(
        "bf16", [64, 16, 32, 2, 4, 1, 1], gathered=True
    ),
    "fp8_training_triton_grouped_gemm": _fp8_training_triton_check,
    "relu2_fp32_ragged_blocks": lambda: _relu2_check(torch.float32),
    "relu2_fp64_gradcheck": lambda: _relu2_check(torch.float64, shape=(2, 3, 13), block=32),
    "relu2_bf16_one_block": lambda: _relu2_check(torch.bfloat16, shape=(2, 16), block=4096),
    "moe_weighted_combine": _moe_combine_check,
    "moe_weighted_combine_with_add": lambda: _moe_combine_check(with_add=True),
    "moe_combine_backward_fp8_rows": _moe_combine_fp8_rows_check,
    "fp8_rows_to_k_places": _fp8_rows_to_check,
    "conv1d_silu_bias_strided": lambda: _conv1d_check(True, True, True),
    "conv1d_plain_no_bias": lambda: _conv1d_check(False, False, False, b=1, t=5, k=3),
    "conv1d_seq_shorter_than_kernel": lambda: _conv1d_check(True, True, True, t=2),
    "cross_entropy_grad_in_forward": lambda: _cross_entropy_check(True, masked=False),
    "cross_entropy_recompute_masked": lambda: _cross_entropy_check(False, masked=True),
    "cross_entropy_fp8_grad_tiles": _ce_grad_fp8_check,
    "cross_entropy_label_outside_vocabulary": _cross_entropy_bad_label_check,
    "cross_entropy_nan_logit": _cross_entropy_nan_logit_check,
    "cross_entropy_fp8_head_triton_vs_torch": _fp8_head_check,
    "gated_rmsnorm": lambda: _rmsnorm_check(gated=True),
    "rmsnorm_plain_one_group": lambda: _rmsnorm_check(gated=False, group_size=48),
    "ssd_decay_grads_model_regime": lambda: _decay_grads_check("ssd"),
    "mamba_chain_decay_grads_model_regime": lambda: _decay_grads_check("chain"),
    "ssd_divisible": lambda: _ssd_check(l=64, chunk=32, with_state=False),
    "ssd_shorter_than_a_chunk": lambda: _ssd_check(l=5, chunk=32, with_state=False),
    "ssd_seq1_with_state": lambda: _ssd_check(l=1, chunk=16, with_state=True),
    "ssd_ragged_with_state": lambda: _ssd_check(l=45, chunk=32, with_state=True),
    "ssd_one_group_no_final_grad": lambda: _ssd_check(l=20, chunk=16, with_state=True, g=1, final_grad=False),
}


_TRITON_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
    torch.float8_e4m3fn: "fp8e4nv",
    torch.float8_e5m2: "fp8e5",
}


def _launch_spec(fn, args, kwargs) -> dict:
    """What compiling `fn` for a GPU needs from one interpreted launch: its module and name, a
    Triton signature from the arguments' types, the constexpr values and the launch options."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    params = JITFunction(fn).params
    values = dict(zip((p.name for p in params), args))
    values.update({k: v for k, v in kwargs.items() if k in values or any(p.name == k for p in params)})
    signature, constexprs = {}, {}
    for p in params:
        v = values.get(p.name, p.default)
        if p.is_constexpr or v is None:
            signature[p.name] = "constexpr"
            constexprs[p.name] = {"tl_dtype": str(v)} if isinstance(v, tl.dtype) else v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _TRITON_TYPES[v.dtype]
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i64" if abs(v) >= 2**31 else "i32"
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        elif type(v).__name__ == "TensorDescriptor":  # host-side TMA descriptor: Triton's own name
            from triton.runtime.jit import mangle_type

            signature[p.name] = mangle_type(v)
        else:
            raise TypeError(f"{fn.__name__}.{p.name}: no Triton type for {type(v).__name__}")
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    return dict(
        module=fn.__module__, name=fn.__name__, signature=signature, constexprs=constexprs, options=options
    )


def _record_launches(launches: dict[str, dict], check: list[str]) -> None:
    """Record each interpreted kernel's first launch in the running check (`check[0]`) into
    `launches[check[0]]` (kernel name -> spec)."""
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        key = f"{self.fn.__module__}.{self.fn.__name__}"
        seen = launches.setdefault(check[0], {})
        if key not in seen:
            seen[key] = _launch_spec(self.fn, args, kwargs)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run


def _claimed(claims: Path | None, name: str) -> bool:
    """Whether this process runs `name`: always alone, else if it created the claim first."""
    if claims is None:
        return True
    try:
        os.close(os.open(claims / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("interpret_checks must run with TRITON_INTERPRET=1")
    out, rest = argv[0], argv[1:]
    claims = None
    if rest[:1] == ["--claim-in"]:
        claims, rest = Path(rest[1]), rest[2:]
    names = rest or list(CHECKS)
    torch.manual_seed(0)
    launches: dict[str, dict] = {}
    running = [""]
    _record_launches(launches, running)
    results = {}
    for name in names:
        if not _claimed(claims, name):
            continue
        running[0] = name
        try:
            CHECKS[name]()
            results[name] = "ok"
        except Exception:  # recorded per check; the test reports the text
            results[name] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(results, f)
    with open(out.removesuffix(".json") + ".launches.json", "w") as f:
        json.dump(launches, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
