"""Training-loop helpers that must see every shard: the global gradient norm."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


@torch.no_grad()
def grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Norm of all gradients as one vector, whatever mesh each gradient lives on (dense
    parameters on the DP x TP mesh, routed experts on the EDP x EP mesh, plain tensors).
    `torch.nn.utils.clip_grad_norm_` cannot combine DTensors of different meshes."""
    by_mesh: dict[object, list[torch.Tensor]] = {}
    plain: list[torch.Tensor] = []
    for p in parameters:
        if p.grad is None:
            continue
        if isinstance(p.grad, DTensor):
            by_mesh.setdefault(p.grad.device_mesh, []).append(p.grad)
        else:
            plain.append(p.grad)
    parts: list[torch.Tensor] = []
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type, foreach=True)
        parts.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if plain:
        parts.append(torch.nn.utils.get_total_norm(plain, norm_type, foreach=True))
    if not parts:
        return torch.zeros(())
    device = parts[0].device
    stacked = torch.stack([t.to(device, torch.float32) for t in parts])
    if math.isinf(norm_type):
        return stacked.max()
    return stacked.pow(norm_type).sum().pow(1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float,
                    norm_type: float = 2.0) -> torch.Tensor:
    """Drop-in for `torch.nn.utils.clip_grad_norm_` on a parallelised model; returns the
    total norm (a plain tensor, identical on every rank)."""
    params = [p for p in parameters if p.grad is not None]
    total = grad_norm(params, norm_type)
    if math.isfinite(max_norm):
        by_mesh: dict[object, list[torch.Tensor]] = {}
        for p in params:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            by_mesh.setdefault(key, []).append(p)
        for group in by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
