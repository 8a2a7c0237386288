"""The Mamba-2 mixer of Nemotron 3 Nano (docs/model.md, "Mamba-2 mixer").

    zxBCdt = in_proj(u)                           split: z, x, B, C, dt
    xBC    = silu(causal_depthwise_conv1d(xBC))   kernel 4, with bias
    dt     = clamp(softplus(dt + dt_bias))        float32
    A      = -exp(A_log)                          float32
    y      = SSD(x, dt, A, B, C) + D * x          per head
    out    = out_proj(gated_rmsnorm(y, z))        norm(y * silu(z)) over groups

Under tensor parallelism (`tensor_parallel`, models/nano3/parallel.py) a rank computes its
slice of the heads and groups: it gathers the whole sequence, takes its rows of every packed
parameter (in_proj packs z|x|B|C|dt, conv1d x|B|C) and hands its partial output to `out_proj`,
whose row-parallel plan sums the ranks' parts and scatters the sequence again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nemotron.kernels import mamba_chain
from nemotron.kernels.conv1d import causal_conv1d
from nemotron.kernels.rmsnorm import gated_rmsnorm
from nemotron.kernels.ssd import ssd
from nemotron.models.nano3.config import Nano3Config
from nemotron.models.nano3.norm import GatedRMSNorm, upcast
from nemotron.models.nano3.parallel import ContextParallelOps, HeadParallelOps

# The released model's dt limit: softplus output is never clamped in practice.
DT_LIMIT = (0.0, float("inf"))
# Megatron's A initialisation range: A_log = log(U(1, 16)).
A_INIT_RANGE = (1.0, 16.0)


class Mamba2Mixer(nn.Module):
    def __init__(self, config: Nano3Config) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.mamba_num_heads
        self.head_dim = config.mamba_head_dim
        self.state_size = config.mamba_state_size
        self.num_groups = config.mamba_num_groups
        self.chunk_size = config.mamba_chunk_size
        self.d_inner = config.mamba_d_inner
        self.conv_dim = self.d_inner + 2 * self.num_groups * self.state_size
        self.init_std = config.init_std
        self.output_init_std = config.output_init_std
        self.dt_min, self.dt_max, self.dt_init_floor = (
            config.mamba_dt_min,
            config.mamba_dt_max,
            config.mamba_dt_init_floor,
        )

        self.in_proj = nn.Linear(self.hidden_size, self.d_inner + self.conv_dim + self.num_heads, bias=False)
        # Depthwise: each of the x, B, C channels is convolved with its own length-4 causal filter.
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=config.mamba_conv_kernel,
            groups=self.conv_dim,
            padding=config.mamba_conv_kernel - 1,
            bias=True,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.num_groups, eps=config.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, self.hidden_size, bias=False)
        # Extension points (models/nano3/parallel.py), None on one device. Context parallel: u
        # is this rank's part of each sequence; the conv1d and the scan take their left context
        # from the object. Tensor parallel: this rank computes a slice of the heads.
        self.context_parallel: ContextParallelOps | None = None
        self.tensor_parallel: HeadParallelOps | None = None
        # The SSM parameters are excluded from weight decay (as in Megatron / mamba_ssm).
        for p in (self.dt_bias, self.A_log, self.D):
            setattr(p, "_no_weight_decay", True)  # a marker train/optimizer.py reads
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.in_proj.weight, std=self.init_std)
        nn.init.normal_(self.out_proj.weight, std=self.output_init_std)
        self.conv1d.reset_parameters()  # PyTorch's default, as Megatron leaves it
        # dt log-uniform in [dt_min, dt_max], floored, stored as softplus^-1(dt) so that
        # softplus(0 + dt_bias) = dt at initialisation.
        device = self.dt_bias.device
        log_dt = torch.rand(self.num_heads, device=device) * (
            math.log(self.dt_max) - math.log(self.dt_min)
        ) + math.log(self.dt_min)
        dt = torch.exp(log_dt).clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.empty(self.num_heads, device=device).uniform_(*A_INIT_RANGE)))
        nn.init.ones_(self.D)
        self.norm.reset_parameters()

    @property
    def chain_shape(self) -> mamba_chain.MambaChainShape:
        """The sizes the fused chain needs (it runs on one device or under FSDP only)."""
        return mamba_chain.MambaChainShape(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            num_groups=self.num_groups,
            state_size=self.state_size,
            chunk_size=self.chunk_size,
            eps=self.norm.eps,
            dt_limit=DT_LIMIT,
        )

    def _rows(self, param: torch.Tensor, segments: list[int]) -> torch.Tensor:
        """This rank's 1/TP slice of each segment of a packed parameter's first dimension
        (the whole parameter without tensor parallelism)."""
        tp = self.tensor_parallel
        if tp is None:
            return param
        parts, start = [], 0
        for size in segments:
            part = size // tp.size
            parts.append(param[start + tp.rank * part : start + (tp.rank + 1) * part])
            start += size
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u [batch, seq, hidden] -> [batch, seq, hidden] (under tensor parallelism: this rank's
        sequence shard in, its shard of the partial sums out, which `out_proj`'s plan reduces)."""
        tp, cp = self.tensor_parallel, self.context_parallel
        if tp is not None:
            u = tp.gather_sequence(u)  # this rank's heads need every position
        shards = 1 if tp is None else tp.size
        heads, groups = self.num_heads // shards, self.num_groups // shards
        d_inner, gn = self.d_inner // shards, groups * self.state_size
        full_gn = self.num_groups * self.state_size
        b, s, _ = u.shape

        if tp is None:
            zxbcdt = self.in_proj(u)
        else:
            in_rows = [self.d_inner, self.d_inner, full_gn, full_gn, self.num_heads]
            zxbcdt = F.linear(u, self._rows(self.in_proj.weight, in_rows))
        if tp is None and cp is None and mamba_chain.chain_supported(zxbcdt, self.chunk_size):
            # The fused fast path: conv, SSD, D skip and gated norm in one autograd node.
            y = mamba_chain.mamba_chain(
                zxbcdt,
                self.conv1d.weight,
                self.conv1d.bias,
                self.dt_bias,
                self.A_log,
                self.D,
                self.norm.weight,
                self.chain_shape,
            )
            return self.out_proj(y.to(zxbcdt.dtype))
        z, xBC, dt = torch.split(zxbcdt, [d_inner, d_inner + 2 * gn, heads], dim=-1)

        conv_rows = [self.d_inner, full_gn, full_gn]
        conv_weight = self._rows(self.conv1d.weight, conv_rows)
        conv_bias = None if self.conv1d.bias is None else self._rows(self.conv1d.bias, conv_rows)
        if cp is not None:
            # each local chunk takes its left context from the chunk before it in the sequence
            xBC = F.silu(cp.causal_conv1d(xBC, conv_weight, conv_bias))
        else:
            xBC = causal_conv1d(xBC, conv_weight, conv_bias, activation="silu")
        x, B, C = torch.split(xBC, [d_inner, gn, gn], dim=-1)

        dt_bias, A_log, D = (self._rows(p, [self.num_heads]) for p in (self.dt_bias, self.A_log, self.D))
        dt = F.softplus(upcast(dt) + upcast(dt_bias)).clamp(*DT_LIMIT)
        A = -torch.exp(upcast(A_log))
        x = x.reshape(b, s, heads, self.head_dim)
        scan = ssd if cp is None else cp.ssd
        y, _ = scan(
            x,
            dt,
            A,
            B.reshape(b, s, groups, self.state_size),
            C.reshape(b, s, groups, self.state_size),
            self.chunk_size,
        )
        # D skip added in float32 and rounded once to the activation dtype (as mamba_ssm's
        # kernels output y); the gated norm computes its statistics in float32 internally.
        y = (upcast(y) + upcast(x) * upcast(D)[:, None]).to(x.dtype).reshape(b, s, d_inner)
        if tp is None:
            y = self.norm(y, z)
        else:
            y = gated_rmsnorm(
                y,
                z,
                self._rows(self.norm.weight, [self.d_inner]),
                self.d_inner // self.num_groups,
                self.norm.eps,
            )
        return self.out_proj(y.to(z.dtype))
