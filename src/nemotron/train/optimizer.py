"""AdamW with the Nano3 recipe's parameter groups.

Weight decay follows Megatron-Core's standard rule (`get_standard_config_overrides`: weight-decay
multiplier 0 for every 1-D parameter and every `*.bias`): so never on norms, biases or Mamba's
A_log, D, dt_bias and conv1d bias, and on every other parameter (the matrices, the experts,
the router, the embedding, the LM head and Mamba's 3-D conv1d weight). The MoE expert bias is a
buffer, not a parameter, so the optimiser never sees it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nemotron.train.config import OptimizerConfig
from nemotron.train.schedule import ON_RESUME, ScheduleChangeError, ScheduleConfigError

# The AdamW settings the config gives every group, which a checkpoint's optimizer state also
# carries: torch's `load_state_dict` takes each group's from the checkpoint, so without a check
# a resumed run would silently keep the old ones whatever its config says.
HYPERPARAMETERS = ("weight_decay", "betas", "eps")
# How this process runs the update, not what it computes (fused on CUDA, not on CPU): always
# this process's, whatever machine wrote the checkpoint.
IMPLEMENTATION = ("fused", "foreach")


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


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each group's hyperparameters and implementation flags (taken before a checkpoint is
    loaded into the optimizer: the config's; after: the checkpoint's)."""
    keys = (*HYPERPARAMETERS, *IMPLEMENTATION)
    return [{k: group[k] for k in keys if k in group} for group in optimizer.param_groups]


def _config_values(settings: list[dict[str, Any]]) -> dict[str, Any]:
    """The `optimizer.*` values the groups hold (weight decay: the decayed group's)."""
    first = settings[0] if settings else {}
    betas = first.get("betas", (None, None))
    return {
        "weight_decay": max((g["weight_decay"] for g in settings), default=None),
        "beta1": betas[0],
        "beta2": betas[1],
        "eps": first.get("eps"),
    }


def resume_hyperparameters(
    optimizer: torch.optim.Optimizer, configured: list[dict[str, Any]], policy: str, where: str
) -> str | None:
    """After a checkpoint was loaded into `optimizer`: compare its groups' AdamW settings with
    the config's (`configured`, `group_settings` of the freshly built optimizer) and decide by
    `scheduler.on_resume`, as Megatron's scheduler does for its weight decay: strict refuses,
    checkpoint keeps the checkpoint's, config takes the config's. Returns the announcement of
    a kept or replaced change (None when they agree). `where` names the checkpoint."""
    if policy not in ON_RESUME:
        raise ScheduleConfigError(f"scheduler.on_resume {policy!r} is not one of {ON_RESUME}")
    loaded = group_settings(optimizer)
    for group, settings in zip(optimizer.param_groups, configured):
        for key in IMPLEMENTATION:
            if key in settings:
                group[key] = settings[key]
    if len(loaded) == len(configured) and all(
        a.get(k) == b.get(k) for a, b in zip(loaded, configured) for k in HYPERPARAMETERS
    ):
        return None
    saved, config = _config_values(loaded), _config_values(configured)
    changed = ", ".join(f"optimizer.{k} {saved[k]} -> {config[k]}" for k in saved if saved[k] != config[k])
    change = (
        f"the optimizer settings differ from the ones {where} was trained with ({changed or 'per group'})"
    )
    if policy == "strict":
        raise ScheduleChangeError(
            f"{change}; set scheduler.on_resume=checkpoint to keep the checkpoint's or "
            f"scheduler.on_resume=config to take this config's"
        )
    if policy == "checkpoint":
        return f"{change}; keeping the checkpoint's (scheduler.on_resume=checkpoint)"
    for group, settings in zip(optimizer.param_groups, configured):
        for key in HYPERPARAMETERS:
            group[key] = settings[key]
    return f"{change}; taking this config's (scheduler.on_resume=config)"
