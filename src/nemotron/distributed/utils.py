"""Training-loop helpers that must see every shard: joining the launcher's process group and
the global gradient norm."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from nemotron.kernels.cross_entropy import IGNORE_INDEX, token_weights

LAUNCHER_ENV = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def flag_device(group=None) -> torch.device:
    """Where a small control tensor must live for a collective on `group` (CUDA under NCCL)."""
    backend = dist.get_backend(group)
    if "gloo" in backend or "cpu" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_ranks_true(value: bool, group=None) -> bool:
    """True on every rank of `group` (default: all) when `value` is True on every one of them:
    one decision the ranks share, where each sees a file system or a clock of its own. Without
    a process group, `value` itself. Every rank of `group` must call it at the same point."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    flag = torch.tensor([1 if value else 0], device=flag_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


@contextlib.contextmanager
def launcher_process_group(
    device_type: str, *, one_rank: bool = False, reported: tuple[type[BaseException], ...] = ()
) -> Iterator[bool]:
    """Join the process group that `torchrun` (or `srun ... torchrun`) describes in the
    environment, for the duration of the block; yields whether a process group is in use.

    Without it, N processes started by torchrun would each train alone as "rank 0" and race
    on the same checkpoint files. Nothing happens when WORLD_SIZE is unset or 1 (unless
    `one_rank`: then a one-rank group on a free local port, for FSDP2 on a one-device mesh), or
    when the caller already initialised torch.distributed (that group is used and left alone).
    `device_type` "cuda" uses NCCL for tensors on the GPU and gloo for CPU tensors (which
    async checkpointing and small control messages need); anything else uses gloo.
    `reported`: exceptions the caller has already told the user about (the CLI's exit after
    its one error line); a rank failing with one of them prints nothing more.
    """
    if dist.is_initialized():
        yield True
        return
    backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        if not one_rank:
            yield False
            return
        # The store listens on a port the kernel picks as it binds: a port picked free first and
        # bound afterwards could be taken in between by another process (EADDRINUSE).
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    else:
        missing = [name for name in LAUNCHER_ENV if not os.environ.get(name)]
        if missing:
            raise RuntimeError(
                f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the "
                f"processes with torchrun (it sets all of them)"
            )
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    try:
        yield True
    except BaseException as exc:
        if world > 1 and device_type == "cuda":
            # A failing rank must not wait for its peers: they are blocked in a collective this
            # rank will never join, and NCCL's teardown (destroy_process_group) then waits for
            # them, so the error was never printed and the job hung until the launcher's limit
            # (the 4-GPU whole-model run of docs/benchmarks.md). Say which rank failed at once
            # and leave the communicators to be aborted when the process exits.
            if not isinstance(exc, reported):
                rank = os.environ.get("RANK", "?")
                print(
                    f"rank {rank} failed: {type(exc).__name__}: {exc}".split("\n")[0],
                    file=sys.stderr,
                    flush=True,
                )
            raise
        dist.destroy_process_group()
        raise
    else:
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
def scale_grads_to_norm_(parameters: Iterable[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Megatron's `clip_grad_by_total_norm_fp32`: multiply every gradient by
    `max_norm / (total_norm + 1e-6)` when that coefficient is below 1 (so also at a norm equal
    to `max_norm`). A non-finite norm, or `max_norm` 0 (off, as `train.grad_clip` 0 and
    Megatron's `--clip-grad 0`) or infinite, scales nothing: a NaN coefficient would poison
    every gradient, and the caller skips such a step anyway. The one home of the rule.

    A negative or NaN `max_norm` is a ValueError: torch would flip (or poison) every gradient
    with it, and "off" is spelt 0."""
    if not max_norm >= 0:  # also NaN
        raise ValueError(f"max_norm must be >= 0 (0 = no clipping), got {max_norm}")
    if not (max_norm > 0 and math.isfinite(total_norm)):
        return
    coefficient = max_norm / (total_norm + 1e-6)
    if coefficient >= 1.0:
        return
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:  # one foreach call per mesh: foreach cannot mix meshes
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    for grads in by_mesh.values():
        torch._foreach_mul_(grads, coefficient)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a parallelised model (gradients on several
    meshes), with Megatron's clipping rule (`scale_grads_to_norm_`) rather than torch's:
    `max_norm` 0 turns clipping off, as `train.grad_clip` 0 and Megatron's `--clip-grad 0` do
    (torch would zero every gradient), and a non-finite norm scales nothing (torch would
    multiply every gradient by NaN). Returns the total norm before clipping (a plain tensor,
    identical on every rank)."""
    params = [p for p in parameters if p.grad is not None]
    total = grad_norm(params, norm_type)
    scale_grads_to_norm_(params, max_norm, float(total))
    return total


# -- loss averaged over tokens -------------------------------------------------------------------
# The training loss of a step is the mean over every loss token of the global batch (all
# micro-batches, all data-parallel ranks), as Megatron's calculate_per_token_loss makes it; not
# a mean of per-rank or per-micro-batch means, which overweights tokens of sparse batches.


def padding_mask(labels: torch.Tensor) -> torch.Tensor | None:
    """[batch, seq] True at the padding of a mixed-length micro-batch, None without padding.
    The loader pads shorter samples with labels IGNORE_INDEX (`train.data.collate`), which no
    sample's own labels hold. Read from the labels on the host, before they move to the device:
    no device sync."""
    pad = labels == IGNORE_INDEX
    return pad if bool(pad.any()) else None


def loss_tokens(labels: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Weight sum a micro-batch's token-mean loss divides by (the rule of the model's
    cross-entropy: loss_mask weights, labels == IGNORE_INDEX excluded); float64 scalar."""
    return token_weights(labels, loss_mask, torch.float64).sum().cpu()


def _sum_over_loss_group(values: torch.Tensor, mesh) -> torch.Tensor:
    """Sum a small float64 CPU tensor over the ranks holding different tokens (DP x CP)."""
    if mesh is None or mesh.loss_group_size == 1:
        return values
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if mesh.world.device_type == "cuda"
        else torch.device("cpu")
    )
    values = values.to(device)
    dist.all_reduce(values, group=mesh.loss_group)
    return values.cpu()


def token_loss_weights(token_counts: Sequence[torch.Tensor | float], mesh) -> tuple[list[float], float]:
    """Loss weights for the micro-batches of one step on this rank, and the step's global
    token count N (summed over micro-batches and the DP x CP ranks of `mesh`, which hold
    different tokens).

    With `token_counts[i]` = n_i (see `loss_tokens`), w_i = R * n_i / N, R = DP * CP.
    Backpropagating sum_i w_i * loss_i (each loss_i a token mean) on every rank gives, once
    FSDP2 has averaged gradients over the R ranks, exactly the gradient of the global
    token-mean loss.
    Collective over the loss group (every rank calls it with its own counts)."""
    counts = torch.stack([torch.as_tensor(c, dtype=torch.float64).reshape(()) for c in token_counts])
    total = float(_sum_over_loss_group(counts.sum().reshape(1), mesh)[0])
    ranks = 1 if mesh is None else mesh.loss_group_size
    denominator = max(total, 1.0)
    return [ranks * float(c) / denominator for c in counts], total


def token_loss_weight(loss_mask: torch.Tensor, mesh) -> float:
    """`token_loss_weights` for a step of one micro-batch whose loss tokens are `loss_mask`."""
    return token_loss_weights([loss_mask.detach().to(torch.float64).sum().cpu()], mesh)[0][0]


def global_token_count(loss_mask: torch.Tensor, mesh) -> torch.Tensor:
    """Number of loss tokens in the global batch (one micro-batch or a whole step)."""
    return _sum_over_loss_group(loss_mask.detach().to(torch.float64).sum().cpu().reshape(1), mesh)[0]


def reduce_token_loss(loss_sum: torch.Tensor, tokens: torch.Tensor | float, mesh) -> float:
    """Global token-mean loss from per-rank sums of token losses and token counts."""
    pair = torch.stack(
        [
            torch.as_tensor(loss_sum, dtype=torch.float64).detach().cpu().reshape(()),
            torch.as_tensor(tokens, dtype=torch.float64).cpu().reshape(()),
        ]
    )
    pair = _sum_over_loss_group(pair, mesh)
    return float(pair[0] / pair[1].clamp(min=1.0))
