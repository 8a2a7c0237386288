"""Causal grouped-query attention with no positional embedding (the Mamba-2 layers carry
position), computed by PyTorch's scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemotron.models.nano3.config import Nano3Config


class Attention(nn.Module):
    """GQA: `num_attention_heads` query heads share `num_key_value_heads` key/value heads."""

    def __init__(self, config: Nano3Config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.init_std = config.init_std
        self.output_init_std = config.output_init_std
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        # Set by `nemotron.distributed.parallelize` under context parallelism (x is then this
        # rank's part of each sequence and attention runs over the whole sequence).
        self.context_parallel = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=self.init_std)
        nn.init.normal_(self.o_proj.weight, std=self.output_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, seq, hidden] -> [batch, seq, hidden]."""
        b, s, _ = x.shape
        # [b, s, heads * d] -> [b, heads, s, d], the layout SDPA expects.
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        # Tensor parallelism shards heads, so the head counts come from the tensors, not the config.
        if self.context_parallel is not None:
            out = self.context_parallel.attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
