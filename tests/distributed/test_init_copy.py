"""`_copy_full_into`: the single-device init copied into a DTensor parameter (one process)."""

import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from nemotron.distributed.apply import _copy_full_into


def test_copy_into_a_dtensor_parameter_is_exact_and_silent():
    """The full tensor is a grad-requiring parameter of the init twin; copying it once gave
    torch's "To construct DTensor from torch.Tensor, it's recommended to use
    local_tensor.detach()" on every rank of every distributed run (noise a user cannot act on)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 3), mesh, [Shard(0)]))
        full = torch.nn.Parameter(torch.arange(12.0).view(4, 3))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")
            _copy_full_into(param, full)
        assert torch.equal(param.full_tensor(), full.detach())
    finally:
        dist.destroy_process_group()
