"""Device meshes for a `ParallelDims` layout, built on torch.distributed.DeviceMesh.

One world mesh is unflattened twice, so both views share a root (FSDP2 and DTensor need that):
  dense  ("pp", "dp", "cp", "tp"): attention, Mamba, shared expert, embeddings, LM head
  expert ("pp", "edp", "ep"):      routed experts (EP innermost: an EP group spans TP first)
With context parallelism, DP and CP ranks hold different tokens of the batch: dense parameters
are sharded (and their gradients reduced) over the flattened DP x CP mesh, as torchtitan does
with dp_shard_cp, and losses / token counts are summed over it.
Every process must call `build_mesh` with the same arguments (it creates process groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from nemotron.distributed.parallel_dims import ParallelDims, ParallelLayoutError


@dataclass
class ParallelMesh:
    dims: ParallelDims
    world: DeviceMesh
    dense: DeviceMesh
    expert: DeviceMesh
    dense_dp_tp: DeviceMesh  # dense["dp", "cp", "tp"] flattened
    dense_dp_cp: DeviceMesh  # dense["dp", "cp"] flattened (dense["dp"] when CP is 1)

    # -- sub-meshes -----------------------------------------------------------------------------
    @property
    def dp_mesh(self) -> DeviceMesh:
        """Mesh FSDP2 shards dense parameters over: DP x CP (ranks seeing different tokens)."""
        return self.dense_dp_cp

    @property
    def dp_tp_mesh(self) -> DeviceMesh:
        """DP x CP x TP flattened: FSDP2 shards weights that every TP rank holds whole but
        computes with only in part (Mamba in_proj / conv1d) over it."""
        return self.dense_dp_tp

    @property
    def pp_mesh(self) -> DeviceMesh:
        return self.dense["pp"]

    @property
    def pp_rank(self) -> int:
        return self.dense["pp"].get_local_rank()

    @property
    def pp_size(self) -> int:
        return self.dims.pp

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.dense["tp"]

    @property
    def cp_mesh(self) -> DeviceMesh:
        return self.dense["cp"]

    @property
    def cp_rank(self) -> int:
        """Which chunks of every sequence this rank holds (`context_parallel.cp_shard`)."""
        return self.dense["cp"].get_local_rank()

    @property
    def cp_size(self) -> int:
        return self.dims.cp

    @property
    def ep_mesh(self) -> DeviceMesh:
        return self.expert["ep"]

    @property
    def edp_mesh(self) -> DeviceMesh:
        """Mesh FSDP2 shards routed-expert parameters over."""
        return self.expert["edp"]

    # -- what the training loop needs ---------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        """Which slice of the global batch this rank loads (all CP and TP ranks of a group
        share it)."""
        return self.dense["dp"].get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def loss_group(self) -> dist.ProcessGroup:
        """Ranks holding different tokens (DP x CP): sum token losses and token counts over
        it; FSDP2 averages dense gradients over the same ranks."""
        return self.dense_dp_cp.get_group()

    @property
    def loss_group_size(self) -> int:
        return self.dims.dp * self.dims.cp

    @property
    def balancing_group(self) -> dist.ProcessGroup:
        """Ranks that routed different tokens (DP x CP x TP of one pipeline stage): expert
        counts are summed over it before the bias update (with sequence parallel, each TP rank
        routes its own sequence shard). Other pipeline stages hold other MoE layers."""
        return self.dense_dp_tp.get_group()


def build_mesh(dims: ParallelDims, device_type: str | None = None) -> ParallelMesh:
    """Build the dense and expert meshes. Needs an initialised default process group whose
    size equals `dims.world_size`; `device_type` defaults to "cuda" when available."""
    if not dist.is_initialized():
        raise ParallelLayoutError(
            "build_mesh needs torch.distributed to be initialised "
            "(run under torchrun, or call init_process_group)"
        )
    if dist.get_world_size() != dims.world_size:
        raise ParallelLayoutError(
            f"layout was resolved for world size {dims.world_size} but "
            f"the process group has {dist.get_world_size()} ranks"
        )
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    world = init_device_mesh(device_type, (dims.world_size,), mesh_dim_names=("world",))
    dense = world._unflatten(0, (dims.pp, dims.dp, dims.cp, dims.tp), ("pp", "dp", "cp", "tp"))
    expert = world._unflatten(0, (dims.pp, dims.edp, dims.ep), ("pp", "edp", "ep"))
    # _flatten creates process groups: on every rank, here
    if dims.cp == 1:
        dp_tp, dp_cp = dense["dp", "tp"]._flatten("dp_tp"), dense["dp"]
    else:
        dp_tp = dense["dp", "cp", "tp"]._flatten("dp_cp_tp")
        dp_cp = dense["dp", "cp"]._flatten("dp_cp")
    return ParallelMesh(
        dims=dims, world=world, dense=dense, expert=expert, dense_dp_tp=dp_tp, dense_dp_cp=dp_cp
    )
