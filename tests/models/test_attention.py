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
