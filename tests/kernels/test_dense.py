"""Triton launches take `data_ptr()`, which is 0 for a pending collective result
(`AsyncCollectiveTensor`, as DTensor's parallel styles return): every autograd function that
launches Triton kernels must wait for and unwrap such inputs first."""

import importlib

import pytest
import torch
from torch.distributed._functional_collectives import AsyncCollectiveTensor

from nemotron.kernels.dense import dense, dense_inputs


def test_dense_unwraps_pending_collective_results_only():
    t = torch.arange(6.0).view(2, 3)
    pending = AsyncCollectiveTensor(t)
    assert type(pending) is AsyncCollectiveTensor
    out = dense(pending)
    assert type(out) is torch.Tensor and torch.equal(out, t)
    assert dense(t) is t and dense(None) is None and dense(3) == 3


def test_dense_inputs_hands_plain_tensors_to_the_wrapped_function():
    seen = []

    @dense_inputs
    def forward(ctx, a, b, flag):
        seen.extend([type(a), type(b), flag])
        return a + b

    out = forward(None, AsyncCollectiveTensor(torch.ones(2)), torch.ones(2), True)
    assert seen == [torch.Tensor, torch.Tensor, True] and torch.equal(out, torch.full((2,), 2.0))


TRITON_FUNCTIONS = [
    ("nemotron.kernels.conv1d_triton", "CausalConv1dFunction"),
    ("nemotron.kernels.cross_entropy", "_LinearCrossEntropy"),
    ("nemotron.kernels.mamba_chain_triton", "MambaChainFunction"),
    ("nemotron.kernels.moe_combine_triton", "WeightedCombineFunction"),
    ("nemotron.kernels.moe_router_triton", "RouteTopKFunction"),
    ("nemotron.kernels.relu2_triton", "SquaredReLUFunction"),
    ("nemotron.kernels.rmsnorm_triton", "GatedRMSNormFunction"),
    ("nemotron.kernels.ssd_triton", "_SSDFunction"),
]


@pytest.mark.parametrize("module,name", TRITON_FUNCTIONS)
def test_every_triton_autograd_function_takes_dense_inputs(module, name):
    pytest.importorskip("triton")
    fn = getattr(importlib.import_module(module), name)
    assert getattr(fn.forward, "dense_inputs", False) and getattr(fn.backward, "dense_inputs", False)


def test_the_list_above_names_every_triton_autograd_function():
    """A new Triton autograd function must join TRITON_FUNCTIONS (and take dense inputs)."""
    pytest.importorskip("triton")
    import pkgutil

    import nemotron.kernels as kernels

    listed = set(TRITON_FUNCTIONS)
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"nemotron.kernels.{info.name}")
        source = open(mod.__file__).read()
        if "triton" not in source or "_kernel[" not in source and "kernel_call" not in source:
            continue
        for attr, obj in vars(mod).items():
            if (
                isinstance(obj, type)
                and issubclass(obj, torch.autograd.Function)
                and obj.__module__ == mod.__name__
            ):
                assert (mod.__name__, attr) in listed, f"{mod.__name__}.{attr} is not listed"
