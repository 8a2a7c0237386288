"""AdamW with the Nano3 recipe's parameter groups.

Weight decay follows Megatron-Core's standard rule (`get_standard_config_overrides`: weight-decay
multiplier 0 for every 1-D parameter and every `*.bias`): so never on norms, biases or Mamba's
A_log, D, dt_bias and conv1d bias, and on every other parameter (the matrices, the experts,
the router, the embedding, the LM head and Mamba's 3-D conv1d weight). The MoE expert bias is a
buffer, not a parameter, so the optimiser never sees it.
"""

from __future__ import annotations

import torch
from torch import nn

from nemotron.train.config import OptimizerConfig


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Megatron's rule exactly (by shape and name, not by module type), so that a checkpoint's
    groups and its decay are the ones a Megatron run of the same model would have: a 2-D
    weight decays even inside a norm, a 0-D scalar decays, a bias of any shape does not."""
    return param.ndim == 1 or name == "bias" or name.endswith(".bias")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_no_decay(name, param):
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "names": no_decay_names})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over the model's (fp32 master) parameters; lr is set per step by the schedule."""
    params = parameter_groups(model, cfg.weight_decay)
    on_cuda = any(p.is_cuda for g in params for p in g["params"])
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=True if on_cuda else None,
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
