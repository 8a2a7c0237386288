"""Training-loop helpers that must see every shard: joining the launcher's process group and
the global gradient norm."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

LAUNCHER_ENV = ("RANK", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def launcher_process_group(device_type: str) -> Iterator[bool]:
    """Join the process group that `torchrun` (or `srun ... torchrun`) describes in the
    environment, for the duration of the block; yields whether the run is distributed.

    Without it, N processes started by torchrun would each train alone as "rank 0" and race
    on the same checkpoint files. Nothing happens when WORLD_SIZE is unset or 1, or when the
    caller already initialised torch.distributed (that group is used and left alone).
    `device_type` "cuda" uses NCCL for tensors on the GPU and gloo for CPU tensors (which
    async checkpointing and small control messages need); anything else uses gloo.
    """
    if dist.is_initialized():
        yield True
        return
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        yield False
        return
    missing = [name for name in LAUNCHER_ENV if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the "
                           f"processes with torchrun (it sets all of them)")
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    try:
        yield True
    finally:
        dist.destroy_process_group()


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
