"""Chunked linear cross-entropy == F.cross_entropy on full logits (loss and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from nemotron.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference


def make(n=37, h=8, v=50, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=dtype)
    weight = torch.randn(v, h, generator=gen, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, labels


def grads(fn, hidden, weight, *args, **kw):
    hh = hidden.clone().requires_grad_(True)
    ww = weight.clone().requires_grad_(True)
    loss = fn(hh, ww, *args, **kw)
    (loss * 1.7).backward()
    return loss.detach(), hh.grad, ww.grad


def test_reference_is_f_cross_entropy():
    hidden, weight, labels = make()
    torch.testing.assert_close(
        linear_cross_entropy_reference(hidden, weight, labels), F.cross_entropy(hidden @ weight.t(), labels)
    )


@pytest.mark.parametrize("grad_in_forward", [True, False])
@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_equals_full_logits(grad_in_forward, chunk, masked):
    hidden, weight, labels = make()
    labels[3] = -100
    mask = (torch.arange(labels.numel()) % 3 != 0).to(torch.float64) if masked else None
    want = grads(linear_cross_entropy_reference, hidden, weight, labels, mask)
    got = grads(
        linear_cross_entropy, hidden, weight, labels, mask, chunk_size=chunk, grad_in_forward=grad_in_forward
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_no_grad_forward_and_bf16():
    hidden, weight, labels = make(dtype=torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.bfloat16(), weight.bfloat16(), labels, chunk_size=5)
    want = F.cross_entropy((hidden.bfloat16() @ weight.bfloat16().t()).float(), labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-4)


def test_all_masked_gives_zero_loss_and_grad():
    hidden, weight, labels = make()
    loss, gh, gw = grads(
        linear_cross_entropy, hidden, weight, labels, torch.zeros(labels.shape, dtype=torch.float64)
    )
    assert loss == 0 and gh.abs().max() == 0 and gw.abs().max() == 0


def test_bad_shapes_raise():
    hidden, weight, labels = make()
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(hidden, weight[:, :-1], labels)


@pytest.mark.parametrize("grad_in_forward", [True, False])
def test_autocast_and_mixed_dtypes(grad_in_forward):
    # Mixed dtypes without autocast compute in the promoted dtype (fp32); fp32 inputs under bf16
    # autocast compute in bf16 (as `hidden @ weight.T` would). Grads come back in each input's dtype.
    hidden, weight, labels = make(dtype=torch.float32)
    hh = hidden.bfloat16().requires_grad_(True)
    ww = weight.clone().requires_grad_(True)
    loss = linear_cross_entropy(hh, ww, labels, chunk_size=8, grad_in_forward=grad_in_forward)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(hidden.bfloat16().float() @ weight.t(), labels))
    want = F.cross_entropy((hidden.bfloat16() @ weight.bfloat16().t()).float(), labels)
    assert hh.grad.dtype == torch.bfloat16 and ww.grad.dtype == torch.float32
    h2 = hidden.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss2 = linear_cross_entropy(h2, w2, labels, chunk_size=8, grad_in_forward=grad_in_forward)
    loss2.backward()
    torch.testing.assert_close(loss2, want, rtol=1e-4, atol=1e-4)
    assert h2.grad.dtype == torch.float32 and w2.grad.dtype == torch.float32
    ref_h, ref_w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    linear_cross_entropy_reference(ref_h, ref_w, labels).backward()
    torch.testing.assert_close(w2.grad, ref_w.grad, rtol=0.05, atol=0.02)
    torch.testing.assert_close(h2.grad, ref_h.grad, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("grad_in_forward", [True, False])
@pytest.mark.parametrize("bad", [-1, -7, 50, 1000])
def test_label_outside_vocabulary_gives_nan_not_another_token(grad_in_forward, bad):
    # -1 was clamped to token 0 (a finite loss of the wrong token; F.cross_entropy raises); a
    # label >= V raised an index error here and read past the row in the Triton kernel. Now the
    # loss and that row's gradients are NaN (no host synchronisation), the other rows untouched.
    hidden, weight, labels = make()
    labels[3], labels[5] = bad, -100
    loss, gh, gw = grads(
        linear_cross_entropy, hidden, weight, labels, chunk_size=8, grad_in_forward=grad_in_forward
    )
    assert loss.isnan() and gh[3].isnan().all() and gw.isnan().any()
    good = torch.ones(labels.shape, dtype=torch.bool)
    good[3] = False
    ok_labels = labels.clone()
    ok_labels[3] = -100
    _, want_h, _ = grads(linear_cross_entropy_reference, hidden, weight, ok_labels)
    # the other rows' gradients: those of the loss with row 3 ignored, scaled by the one more
    # token in the denominator
    n_ok = float((labels != -100).sum())
    torch.testing.assert_close(gh[good], want_h[good] * (n_ok - 1) / n_ok, rtol=1e-10, atol=1e-12)


def test_triton_backend_on_cpu_without_interpreter_says_so(monkeypatch):
    # the explicit Triton backend on CPU tensors failed inside Triton ("0 active drivers")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, labels = make()
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        linear_cross_entropy(hidden, weight, labels, backend="triton")
