"""Parallelism on torch.distributed: layout validation, device meshes, FSDP2 / expert / tensor
parallel sharding applied from outside the single-device model (docs/parallelism.md)."""

from nemotron.distributed.config import ParallelismConfig
from nemotron.distributed.expert_parallel import AllToAllDispatcher
from nemotron.distributed.mesh import ParallelMesh, build_mesh
from nemotron.distributed.parallel_dims import ParallelDims, ParallelLayoutError
from nemotron.distributed.parallelize import parallelize
from nemotron.distributed.utils import (
    global_token_count, loss_tokens, reduce_token_loss, token_loss_weight, token_loss_weights,
)

__all__ = [
    "AllToAllDispatcher", "ParallelDims", "ParallelLayoutError", "ParallelMesh",
    "ParallelismConfig", "build_mesh", "global_token_count", "loss_tokens", "parallelize",
    "reduce_token_loss", "token_loss_weight", "token_loss_weights",
]
