"""Non-gated squared-ReLU MLP: the dense `-` block and the MoE's shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _SquaredReLU(torch.autograd.Function):
    # Saves only the input (autograd through relu then square would also keep relu's output,
    # one more [tokens x ffn] activation per MLP) and needs fewer elementwise passes.
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return F.relu(x).square_()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * F.relu(x).mul_(2)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU, `relu(x)^2`, the activation of every Nano3 MLP and expert."""
    return _SquaredReLU.apply(x)


class MLP(nn.Module):
    """`down_proj(relu2(up_proj(x)))`, no biases."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, init_std: float, output_init_std: float) -> None:
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
