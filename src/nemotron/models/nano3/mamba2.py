"""The Mamba-2 mixer of Nemotron 3 Nano (docs/model.md, "Mamba-2 mixer").

    zxBCdt = in_proj(u)                           split: z, x, B, C, dt
    xBC    = silu(causal_depthwise_conv1d(xBC))   kernel 4, with bias
    dt     = clamp(softplus(dt + dt_bias))        float32
    A      = -exp(A_log)                          float32
    y      = SSD(x, dt, A, B, C) + D * x          per head
    out    = out_proj(gated_rmsnorm(y, z))        norm(y * silu(z)) over groups
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nemotron.kernels import mamba_chain
from nemotron.kernels.conv1d import causal_conv1d
from nemotron.kernels.ssd import ssd
from nemotron.models.nano3.config import Nano3Config
from nemotron.models.nano3.norm import GatedRMSNorm, upcast

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
            config.mamba_dt_min, config.mamba_dt_max, config.mamba_dt_init_floor,
        )

        self.in_proj = nn.Linear(self.hidden_size, self.d_inner + self.conv_dim + self.num_heads, bias=False)
        # Depthwise: each of the x, B, C channels is convolved with its own length-4 causal filter.
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=config.mamba_conv_kernel,
            groups=self.conv_dim, padding=config.mamba_conv_kernel - 1, bias=True,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.num_groups, eps=config.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, self.hidden_size, bias=False)
        # Set by `nemotron.distributed.parallelize` under context parallelism: u is then this
        # rank's part of each sequence; the conv1d and the scan take their left context from it.
        self.context_parallel = None
        # The SSM parameters are excluded from weight decay (as in Megatron / mamba_ssm).
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
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
        """The sizes the fused chain needs, read at call time (tensor parallelism narrows them)."""
        return mamba_chain.MambaChainShape(
            num_heads=self.num_heads, head_dim=self.head_dim, num_groups=self.num_groups,
            state_size=self.state_size, chunk_size=self.chunk_size, eps=self.norm.eps, dt_limit=DT_LIMIT,
        )

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u [batch, seq, hidden] -> [batch, seq, hidden]."""
        b, s, _ = u.shape
        zxbcdt = self.in_proj(u)
        if (self.context_parallel is None and "forward" not in vars(self.conv1d)
                and mamba_chain.chain_supported(zxbcdt, self.chunk_size)):
            # The fused fast path: conv, SSD, D skip and gated norm in one autograd node.
            y = mamba_chain.mamba_chain(
                zxbcdt, self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D,
                self.norm.weight, self.chain_shape,
            )
            return self.out_proj(y.to(zxbcdt.dtype))
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.num_heads], dim=-1)

        if self.context_parallel is not None:
            # Context parallelism: each local chunk takes its left context from the chunk before it.
            xBC = F.silu(self.context_parallel.causal_conv1d(self.conv1d, xBC))
        elif "forward" in vars(self.conv1d):
            # The conv module's forward was replaced from outside (tensor parallelism computes
            # a rank's channel slice): call it. Causal: pad k-1 both sides, keep the first s.
            xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :s].transpose(1, 2))
        else:
            xBC = causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias, activation="silu")
        x, B, C = torch.split(
            xBC, [self.d_inner, self.num_groups * self.state_size, self.num_groups * self.state_size], dim=-1
        )

        dt = F.softplus(upcast(dt) + upcast(self.dt_bias)).clamp(*DT_LIMIT)
        A = -torch.exp(upcast(self.A_log))
        x = x.reshape(b, s, self.num_heads, self.head_dim)
        scan = ssd if self.context_parallel is None else self.context_parallel.ssd
        y, _ = scan(
            x, dt, A,
            B.reshape(b, s, self.num_groups, self.state_size),
            C.reshape(b, s, self.num_groups, self.state_size),
            self.chunk_size,
        )
        # D skip added in float32 and rounded once to the activation dtype (as mamba_ssm's
        # kernels output y); the gated norm computes its statistics in float32 internally.
        y = (upcast(y) + upcast(x) * upcast(self.D)[:, None]).to(x.dtype)
        y = self.norm(y.reshape(b, s, self.d_inner), z)
        return self.out_proj(y.to(z.dtype))
