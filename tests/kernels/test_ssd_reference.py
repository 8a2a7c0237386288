"""Chunked SSD reference == step-by-step recurrence, outputs and gradients, in float64."""

import pytest
import torch

from nemotron.kernels.ssd import ssd, ssd_chunked_reference, ssd_recurrent_reference


def make_inputs(b=2, l=13, h=4, p=3, g=2, n=5, seed=0, with_state=False, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen, dtype=dtype) - 1.0)
    A = -torch.exp(torch.rand(h, generator=gen, dtype=dtype) * 2.0)
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    s0 = torch.randn(b, h, p, n, generator=gen, dtype=dtype) if with_state else None
    return x, dt, A, B, C, s0


def test_recurrence_matches_hand_computed_single_step():
    x, dt, A, B, C, _ = make_inputs(b=1, l=1, h=2, p=2, g=1, n=3)
    y, s = ssd_recurrent_reference(x, dt, A, B, C)
    expected_state = dt[0, 0, :, None, None] * x[0, 0, :, :, None] * B[0, 0, 0][None, None, :]
    torch.testing.assert_close(s[0], expected_state)
    torch.testing.assert_close(y[0, 0], expected_state @ C[0, 0, 0])


def test_group_to_head_mapping():
    # heads 0,1 read group 0; heads 2,3 read group 1: zeroing group 1's B silences heads 2,3 only.
    x, dt, A, B, C, _ = make_inputs(h=4, g=2)
    B = B.clone()
    B[:, :, 1] = 0
    y, _ = ssd_recurrent_reference(x, dt, A, B, C)
    assert y[:, :, 2:].abs().max() == 0
    assert y[:, :, :2].abs().max() > 0


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("l,chunk", [(13, 4), (16, 4), (5, 8), (1, 3)])
def test_chunked_equals_recurrent(with_state, l, chunk):
    inputs = make_inputs(l=l, with_state=with_state)
    y_r, s_r = ssd_recurrent_reference(*inputs[:5], initial_state=inputs[5])
    y_c, s_c = ssd_chunked_reference(*inputs[:5], chunk_size=chunk, initial_state=inputs[5])
    torch.testing.assert_close(y_c, y_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s_c, s_r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_gradients_equal_recurrent(with_state):
    base = make_inputs(l=11, with_state=with_state, seed=3)
    gen = torch.Generator().manual_seed(7)
    gy = torch.randn(base[0].shape, generator=gen, dtype=torch.float64)
    gs = torch.randn(
        base[0].shape[0],
        base[0].shape[2],
        base[0].shape[3],
        base[3].shape[3],
        generator=gen,
        dtype=torch.float64,
    )

    def grads(fn, **kw):
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in base]
        y, s = fn(*leaves[:5], initial_state=leaves[5], **kw)
        ((y * gy).sum() + (s * gs).sum()).backward()
        return [t.grad for t in leaves if t is not None]

    for g_c, g_r in zip(grads(ssd_chunked_reference, chunk_size=4), grads(ssd_recurrent_reference)):
        torch.testing.assert_close(g_c, g_r, rtol=1e-9, atol=1e-9)


def test_chunked_gradcheck():
    x, dt, A, B, C, s0 = make_inputs(b=1, l=6, h=2, p=2, g=1, n=2, with_state=True, seed=5)
    args = [t.requires_grad_(True) for t in (x, dt, A, B, C, s0)]

    def fn(x, dt, A, B, C, s0):
        return ssd_chunked_reference(x, dt, A, B, C, chunk_size=4, initial_state=s0)

    assert torch.autograd.gradcheck(fn, args)


def test_chunked_low_precision_inputs_computed_in_fp32():
    x, dt, A, B, C, _ = make_inputs(l=9, dtype=torch.float32)
    y_ref, s_ref = ssd_recurrent_reference(x, dt, A, B, C)
    y, s = ssd_chunked_reference(x.bfloat16(), dt.bfloat16(), A, B.bfloat16(), C.bfloat16(), chunk_size=4)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref, rtol=5e-2, atol=5e-2)


def test_dispatch_on_cpu_uses_chunked_reference():
    inputs = make_inputs(l=7)
    y, s = ssd(*inputs[:5], chunk_size=4)
    y_c, s_c = ssd_chunked_reference(*inputs[:5], chunk_size=4)
    torch.testing.assert_close(y, y_c, rtol=0, atol=0)
    torch.testing.assert_close(s, s_c, rtol=0, atol=0)


def test_bad_shapes_raise():
    x, dt, A, B, C, _ = make_inputs(h=4, g=2)
    with pytest.raises(ValueError, match="groups"):
        ssd_chunked_reference(x, dt, A, B[:, :, :1].expand(-1, -1, 3, -1), C[:, :, :1].expand(-1, -1, 3, -1))
    with pytest.raises(ValueError, match="dt"):
        ssd_chunked_reference(x, dt[:, :-1], A, B, C)
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked_reference(x, dt, A, B, C, initial_state=torch.zeros(1))


def test_triton_path_only_for_chunks_it_supports():
    from types import SimpleNamespace

    from nemotron.kernels.ssd import triton_supports

    cuda_bf16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    assert not triton_supports(torch.empty(0), 128)  # CPU: reference path
    assert not triton_supports(SimpleNamespace(is_cuda=True, dtype=torch.float64), 128)
    for chunk, ok in [(8, False), (16, True), (24, False), (64, True), (128, True), (0, False)]:
        assert triton_supports(cuda_bf16, chunk) == ok, chunk


def test_dispatch_chunk_none_is_the_default_chunk():
    # ssd(..., None) raised a TypeError in the dispatch (`None > 0`), where the references take
    # None as DEFAULT_CHUNK_SIZE
    from nemotron.kernels.ssd import DEFAULT_CHUNK_SIZE

    inputs = make_inputs(l=7)
    y, s = ssd(*inputs[:5], None)
    y_c, s_c = ssd_chunked_reference(*inputs[:5], chunk_size=DEFAULT_CHUNK_SIZE)
    torch.testing.assert_close(y, y_c, rtol=0, atol=0)
    torch.testing.assert_close(s, s_c, rtol=0, atol=0)


def test_dispatch_mixed_dtypes_take_the_reference(monkeypatch):
    # B and C in another dtype than x: the kernel refuses them (TypeError), so a CUDA call that
    # the reference answers must not reach it; a CUDA tensor is stood in for by forcing the
    # dispatch's checks on CPU tensors
    import nemotron.kernels.ssd as ssd_mod

    monkeypatch.setattr(ssd_mod, "triton_supports", lambda x, chunk: True)
    monkeypatch.setattr(ssd_mod, "_triton_available", lambda: True)
    x, dt, A, B, C, _ = make_inputs(l=7)
    x32, B64, C64 = x.float(), B.double(), C.double()
    y, s = ssd(x32, dt, A, B64, C64, chunk_size=4)
    y_c, s_c = ssd_chunked_reference(x32, dt, A, B64, C64, chunk_size=4)
    torch.testing.assert_close(y, y_c, rtol=0, atol=0)
    torch.testing.assert_close(s, s_c, rtol=0, atol=0)
