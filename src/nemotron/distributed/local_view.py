"""Running single-device module code on the local shards of DTensor parameters.

The model's forward code uses its parameters as plain tensors. Where a sharding keeps a module
computing on local data (routed experts under EP, Mamba heads and norms under TP), its forward
is wrapped so that, for the duration of the call, each DTensor parameter is replaced by a
differentiable local view (`DTensor.to_local`, optionally with other gradient placements or
a row selection) and, if needed, size attributes by their per-rank values.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial


@contextlib.contextmanager
def local_view(swaps: list[tuple[nn.Module, str, torch.Tensor]],
               attrs: list[tuple[object, str, object]] = ()):
    """Temporarily register plain tensors as parameters `(module, name, tensor)` and set
    attributes `(obj, name, value)`; everything is restored on exit."""
    saved_params = [(m, n, m._parameters[n]) for m, n, _ in swaps]
    saved_attrs = [(o, n, getattr(o, n)) for o, n, _ in attrs]
    try:
        for m, n, t in swaps:
            m._parameters[n] = t  # type: ignore[assignment]  # a plain tensor, for one call
        for o, n, v in attrs:
            setattr(o, n, v)
        yield
    finally:
        for m, n, p in saved_params:
            m._parameters[n] = p
        for o, n, v in saved_attrs:
            setattr(o, n, v)


def local_param(param: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Local compute view of a parameter. A sharded DTensor gives its shard (gradient keeps the
    sharding). A replicated one gives the full tensor, optionally only `rows`, with a `Partial`
    gradient: each rank contributes what its own tokens / heads need, the reduction sums them."""
    if not isinstance(param, DTensor):
        return param if rows is None else param.index_select(0, rows)
    if param.placements[0].is_replicate():
        local = param.to_local(grad_placements=[Partial()])
        return local if rows is None else local.index_select(0, rows)
    return param.to_local()


def run_on_local_params(module: nn.Module) -> None:
    """Wrap `module.forward` so it sees its own DTensor parameters as local tensors."""
    if getattr(module, "_nemotron_local_params", False):
        return
    inner_forward = module.forward

    def forward(*args, **kwargs):
        swaps = [(module, name, local_param(p)) for name, p in module._parameters.items()
                 if isinstance(p, DTensor)]
        with local_view(swaps):
            return inner_forward(*args, **kwargs)

    module.forward = forward
    module._nemotron_local_params = True
