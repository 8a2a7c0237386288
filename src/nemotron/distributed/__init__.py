"""Parallelism on torch.distributed: layout validation, device meshes, FSDP2 / expert / tensor
parallel sharding applied from outside the single-device model (docs/parallelism.md).

The names below are imported on first use, so that `nemotron.distributed.config` (a plain
dataclass the config schema needs) does not import torch."""

import sys
import types

from nemotron._lazy import lazy_exports

_EXPORTS = {
    "ParallelismConfig": "config",
    "AllToAllDispatcher": "expert_parallel",
    "ParallelMesh": "mesh", "build_mesh": "mesh",
    "ParallelDims": "parallel_dims", "ParallelLayoutError": "parallel_dims",
    "parallelize": "parallelize",
    "global_token_count": "utils", "loss_tokens": "utils", "reduce_token_loss": "utils",
    "token_loss_weight": "utils", "token_loss_weights": "utils",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """`parallelize` is both a submodule and the function it defines: importing the submodule
    (`from nemotron.distributed.parallelize import ...`) must not rebind the package's
    `parallelize` to the module, whichever is imported first."""

    def __setattr__(self, name: str, value) -> None:
        if name == "parallelize" and isinstance(value, types.ModuleType):
            value = value.parallelize
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
