"""Non-gated squared-ReLU MLP: the dense `-` block and the MoE's shared expert."""

from __future__ import annotations

import torch
from torch import nn

# The squared ReLU of every MLP and expert: Triton on CUDA, PyTorch elsewhere.
from nemotron.kernels.relu2 import relu2

__all__ = ["MLP", "relu2"]


class MLP(nn.Module):
    """`down_proj(relu2(up_proj(x)))`, no biases."""

    def __init__(
        self, hidden_size: int, ffn_hidden_size: int, init_std: float, output_init_std: float
    ) -> None:
        super().__init__()
        self.init_std = init_std
        self.output_init_std = output_init_std
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.up_proj.weight, std=self.init_std)
        nn.init.normal_(self.down_proj.weight, std=self.output_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x)))
