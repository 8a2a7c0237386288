"""Parallelism on torch.distributed: layout validation, device meshes, FSDP2 / expert / tensor /
context parallel sharding applied from outside the single-device model (docs/parallelism.md).

The names below are imported on first use, so that `nemotron.distributed.config` (a plain
dataclass the config schema needs) does not import torch. `parallelize` is defined in
`nemotron.distributed.apply` (a submodule of the same name would shadow the function)."""

from nemotron._lazy import lazy_exports

_EXPORTS = {
    "ParallelismConfig": "config",
    "AllToAllDispatcher": "expert_parallel",
    "ParallelMesh": "mesh",
    "build_mesh": "mesh",
    "ParallelDims": "parallel_dims",
    "ParallelLayoutError": "parallel_dims",
    "parallelize": "apply",
    "global_token_count": "utils",
    "loss_tokens": "utils",
    "reduce_token_loss": "utils",
    "token_loss_weight": "utils",
    "token_loss_weights": "utils",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
