"""Fused kernels, each beside its PyTorch reference, with a dispatching function the model calls.

Triton is optional: it is imported lazily, only when a CUDA tensor (or the Triton interpreter,
``TRITON_INTERPRET=1``) asks for a kernel, so this package imports on any CPU machine.

The dispatchers live in their modules: ``nemotron.kernels.ssd.ssd``,
``nemotron.kernels.rmsnorm.{rmsnorm, gated_rmsnorm}``,
``nemotron.kernels.mamba_chain.mamba_chain`` (the fused Mamba-2 mixer between its projections),
``nemotron.kernels.cross_entropy.linear_cross_entropy``, ``nemotron.kernels.relu2.relu2``,
``nemotron.kernels.add_n.add_n``, ``nemotron.kernels.moe_combine.weighted_combine`` and
``nemotron.kernels.fp32_linear.fp32_linear`` (``ssd`` and ``rmsnorm`` are also the
module names, so the package re-exports only names that do not clash with a submodule).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator

import torch

__all__ = [
    "use_triton",
    "triton_available",
    "fast_paths_enabled",
    "fast_paths",
    "ssd_chunked_reference",
    "ssd_recurrent_reference",
    "gated_rmsnorm",
    "gated_rmsnorm_reference",
    "rmsnorm_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "relu2_reference",
    "add_n_reference",
]

_LAZY = {
    "ssd_chunked_reference": "nemotron.kernels.ssd",
    "ssd_recurrent_reference": "nemotron.kernels.ssd",
    "gated_rmsnorm": "nemotron.kernels.rmsnorm",
    "gated_rmsnorm_reference": "nemotron.kernels.rmsnorm",
    "rmsnorm_reference": "nemotron.kernels.rmsnorm",
    "linear_cross_entropy": "nemotron.kernels.cross_entropy",
    "linear_cross_entropy_reference": "nemotron.kernels.cross_entropy",
    "relu2_reference": "nemotron.kernels.relu2",
    "add_n_reference": "nemotron.kernels.add_n",
}


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``triton`` imports (it may still have no GPU to run on)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install raising anything at import time
        return False
    return True


_FAST_PATHS = {"enabled": True}

# The dtypes the Triton kernels compute in. float64 always takes the PyTorch reference path:
# the tests' float64 oracle, and no kernel here is written (or fast) for it.
TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fast_paths_enabled() -> bool:
    """False inside ``fast_paths(False)``: every dispatcher (SSD, norms, LM-head loss, the MoE
    grouped GEMM, squared ReLU, attention's one-GEMM q/k/v projection) then takes its PyTorch
    reference path, also on CUDA."""
    return _FAST_PATHS["enabled"]


def use_triton(*tensors) -> bool:
    """The one dispatch rule of the kernels package: a dispatcher runs its Triton kernel when
    every input tensor is on CUDA in a dtype of `TRITON_DTYPES`, fast paths are on and Triton
    imports; otherwise its PyTorch reference. A kernel's own input limits (the router kernel:
    2-D float32 logits) are checked by its dispatcher in addition."""
    return (
        all(t.is_cuda and t.dtype in TRITON_DTYPES for t in tensors)
        and fast_paths_enabled()
        and triton_available()
    )


@contextlib.contextmanager
def fast_paths(enabled: bool) -> Iterator[None]:
    """Switch the fused/Triton/grouped-GEMM paths on or off for the code inside (process-wide,
    not thread-local): the reference-versus-fast comparisons of benchmarks and GPU tests."""
    previous = _FAST_PATHS["enabled"]
    _FAST_PATHS["enabled"] = bool(enabled)
    try:
        yield
    finally:
        _FAST_PATHS["enabled"] = previous


def __getattr__(name: str):
    # Lazy re-exports keep `import nemotron.kernels` free of heavy imports.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nemotron.kernels' has no attribute {name!r}")
