"""Tensors a Triton kernel can read: waiting for collectives still in flight.

DTensor's parallel styles (tensor/sequence parallelism) redistribute with `async_op=True` and
hand back `AsyncCollectiveTensor`s, forward (a RowwiseParallel output such as the embedding's)
and backward (the gradient of a sequence all-gather). PyTorch ops wait for them on use, but a
Triton launch only takes `data_ptr()`, which is 0 for that wrapper: the kernel then reads
address 0 (an illegal memory access, first seen on 2 H200s under TP2). Every autograd function
that launches Triton kernels therefore takes its tensors through `dense_inputs`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

try:
    from torch.distributed._functional_collectives import AsyncCollectiveTensor
except ImportError:  # a torch build without torch.distributed: no pending collectives exist
    AsyncCollectiveTensor = ()  # type: ignore[assignment,misc]

F = TypeVar("F", bound=Callable)


def dense(t):
    """`t` as a plain `torch.Tensor`: for a pending collective result the tensor it wraps,
    waited for; for a parameter (a norm weight FSDP2 has gathered) a detached view of it, so a
    launcher only ever sees one tensor type. Below autograd only (inside an autograd function or
    on gradients): the plain tensor has no autograd history of its own."""
    if isinstance(t, torch.Tensor) and type(t) is not torch.Tensor:
        if isinstance(t, AsyncCollectiveTensor):
            return t.wait()
        if isinstance(t, torch.nn.Parameter):
            return t.detach()
    return t


def dense_inputs(fn: F) -> F:
    """Decorate an autograd function's `forward(ctx, ...)` / `backward(ctx, ...)`: every tensor
    argument goes through `dense` first."""

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        return fn(ctx, *(dense(a) for a in args))

    wrapper.dense_inputs = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]
