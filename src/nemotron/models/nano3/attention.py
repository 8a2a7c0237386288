"""Causal grouped-query attention with no positional embedding (the Mamba-2 layers carry
position), computed by PyTorch's scaled_dot_product_attention.

The query/key/value projections are three `nn.Linear` modules (the parameter names of the
checkpoint, the HF layout and the tensor-parallel plan). With `fuse_qkv` (the default) and fast
paths on, the forward computes them with one GEMM against the concatenated weight and splits
the output: one input-gradient GEMM instead of three and no bf16 adds of three input gradients
in backward. A layout that gives each projection its own plan (tensor parallel) sets
`fuse_qkv = False`; ``nemotron.kernels.fast_paths(False)`` also keeps the three-Linear path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemotron.kernels import fast_paths_enabled
from nemotron.models.nano3.config import Nano3Config
from nemotron.models.nano3.parallel import ContextParallelOps


class Attention(nn.Module):
    """GQA: `num_attention_heads` query heads share `num_key_value_heads` key/value heads."""

    def __init__(self, config: Nano3Config, fuse_qkv: bool = True) -> None:
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
        # Extension points (models/nano3/parallel.py): one GEMM for q/k/v (a tensor-parallel
        # plan sets False: the projections are sharded differently), and under context
        # parallelism the object that attends the local chunks over the whole sequence.
        self.fuse_qkv = fuse_qkv
        self.context_parallel: ContextParallelOps | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=self.init_std)
        nn.init.normal_(self.o_proj.weight, std=self.output_init_std)

    def fused_qkv_enabled(self) -> bool:
        """True when forward computes q, k and v with one GEMM: `fuse_qkv` and fast paths on, and
        the projections plain `nn.Linear`s (a swapped-in subclass, e.g. FP8's, computes itself)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        return self.fuse_qkv and fast_paths_enabled() and all(type(p) is nn.Linear for p in projections)

    def _project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.fused_qkv_enabled():
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        weights = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]
        if torch.is_autocast_enabled(x.device.type):
            # Cast before concatenating (as autocast would cast each weight for its own Linear):
            # the concatenation then moves compute-dtype bytes. Autocast leaves float64 alone.
            dtype = torch.get_autocast_dtype(x.device.type)
            weights = [
                w.to(dtype) if w.is_floating_point() and w.dtype != torch.float64 else w for w in weights
            ]
        sizes = [w.shape[0] for w in weights]
        # split's backward concatenates q/k/v's gradients, so the input gradient is one GEMM.
        return F.linear(x, torch.cat(weights)).split(sizes, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, seq, hidden] -> [batch, seq, hidden]."""
        b, s, _ = x.shape
        q, k, v = self._project_qkv(x)
        # [b, s, heads * d] -> [b, heads, s, d], the layout SDPA expects.
        q = q.view(b, s, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, s, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        # Tensor parallelism shards heads, so the head counts come from the tensors, not the config.
        if self.context_parallel is not None:
            out = self.context_parallel.attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
