import math

import torch

from nemotron.models.nano3 import Attention

from .tiny import tiny_config


def explicit_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    b, s, _ = x.shape
    q = (x @ attn.q_proj.weight.T).view(b, s, attn.num_heads, attn.head_dim)
    k = (x @ attn.k_proj.weight.T).view(b, s, attn.num_kv_heads, attn.head_dim)
    v = (x @ attn.v_proj.weight.T).view(b, s, attn.num_kv_heads, attn.head_dim)
    out = torch.zeros(b, s, attn.num_heads, attn.head_dim, dtype=x.dtype)
    group = attn.num_heads // attn.num_kv_heads
    for h in range(attn.num_heads):
        kv = h // group  # query head h reads key/value head h // group
        logits = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(attn.head_dim)
        future = torch.ones(s, s, dtype=torch.bool).triu(1)
        probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
        out[:, :, h] = probs @ v[:, :, kv]
    return out.reshape(b, s, -1) @ attn.o_proj.weight.T


def test_attention_equals_explicit_softmax_attention():
    for kv_heads in (2, 4, 1):
        attn = Attention(tiny_config(num_key_value_heads=kv_heads)).double()
        x = torch.randn(2, 6, 32, dtype=torch.float64)
        torch.testing.assert_close(attn(x), explicit_attention(attn, x), rtol=1e-10, atol=1e-12)


def test_attention_has_no_position_embedding():
    # Without positions, the last token's output depends on the earlier tokens only as a set.
    attn = Attention(tiny_config()).double()
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    shuffled = torch.cat([x[:, [2, 0, 3, 1]], x[:, 4:]], dim=1)
    torch.testing.assert_close(attn(x)[:, -1], attn(shuffled)[:, -1])


class _CountMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the matrix multiplications dispatched to ATen (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _run(attn, x, gy, fast):
    from nemotron.kernels import fast_paths

    attn.zero_grad()
    xx = x.clone().requires_grad_(True)
    with fast_paths(fast), _CountMatmuls() as counter:
        y = attn(xx)
        y.backward(gy)
    grads = [xx.grad] + [
        p.grad.clone()
        for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight)
    ]
    return y, grads, counter.count


def test_fused_qkv_projection_matches_three_linears_with_fewer_gemms():
    for kv_heads in (2, 1):
        attn = Attention(tiny_config(num_key_value_heads=kv_heads)).double()
        gen = torch.Generator().manual_seed(kv_heads)
        x = torch.randn(2, 6, 32, dtype=torch.float64, generator=gen)
        gy = torch.randn(2, 6, 32, dtype=torch.float64, generator=gen)
        y, grads, fused_mms = _run(attn, x, gy, fast=True)
        y_ref, grads_ref, ref_mms = _run(attn, x, gy, fast=False)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-13)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-13)
        # three-Linear path: 4 projections forward, dgrad + wgrad each backward = 12 GEMMs;
        # fused q/k/v: 2 projections forward, 4 GEMMs backward
        assert (fused_mms, ref_mms) == (6, 12)


def test_fused_qkv_projection_under_autocast_keeps_parameter_names_and_grads():
    attn = Attention(tiny_config())
    names = [n for n, _ in attn.named_parameters()]
    x = torch.randn(1, 5, 32)
    gy = torch.randn(1, 5, 32)
    outs = []
    for fast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, grads, _ = _run(attn, x, gy, fast)
        assert y.dtype == torch.bfloat16
        assert all(g.dtype == torch.float32 for g in grads[1:])  # fp32 master weights' grads
        outs.append([y] + grads)
    for a, b in zip(*outs):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    assert names == ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
    assert set(attn.state_dict()) == set(names)
