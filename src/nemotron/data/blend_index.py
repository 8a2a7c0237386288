"""The blend's sample index through a compiled loop (`blend_index.cpp`), for large blends.

The largest-deficit rule (`blended.build_blending_indices`, whose Python loop is the reference)
costs about 1.75 us per sample in Python with 25 datasets: some 1.5 hours for the recipe's
3.05e9 samples, while every other rank waits. No vectorised numpy form is both exact and fast
(each sample depends on all the draws before it), so the same loop is compiled, as Megatron-LM
compiles its helper: at first use, with the machine's C++ compiler, through
`torch.utils.cpp_extension` (which finds the compiler, builds with ninja and caches the library
under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, locking it against concurrent
builds; `ninja`, a dependency of this package, runs the build). The source includes neither torch nor Python headers, so the build takes about a second;
the library is called through ctypes and writes straight into the caller's numpy arrays.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger("nemotron.data")

_SOURCE = Path(__file__).with_name("blend_index.cpp")
# Two roundings (the multiply, then the subtraction) as Python does: a fused multiply-subtract
# (which GCC emits by default where the target has one, e.g. aarch64) rounds once and can pick
# another dataset on a near tie.
_CFLAGS = ["-O2", "-ffp-contract=off"]


class BlendIndexCompileError(RuntimeError):
    """The compiled blend index cannot be built or loaded here (no C++ compiler, no ninja...)."""


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs `ninja` from PATH; the `ninja` package this project depends on installs it
    beside the interpreter (the environment's bin/), on PATH only where the environment is
    activated. For the build, that directory is put at the end of PATH (a ninja already on PATH
    comes first), and PATH restored after."""
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja
    except ImportError:  # the build then says that ninja is missing
        yield
        return
    before = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join(p for p in (before, ninja.BIN_DIR) if p)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


@functools.cache
def load_library() -> ctypes.CDLL:
    """The compiled blend-index library, built at the first call of a process (then cached on
    disk by torch); raises BlendIndexCompileError, naming the cause, where it cannot be."""
    try:
        from torch.utils import cpp_extension

        with _ninja_on_path():
            path = cpp_extension.load(
                "nemotron_blend_index", [str(_SOURCE)], extra_cflags=_CFLAGS, is_python_module=False
            )
        library = ctypes.CDLL(str(path))
    except Exception as exc:  # noqa: BLE001 - compiler, ninja, linker, loader: all mean "not here"
        # The compiler's or the shell's own line ("fatal error: ...", "c++: not found"), not
        # ninja's closing one.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [repr(exc)]
        cause = next((line for line in lines if "error:" in line.lower() or "not found" in line), lines[-1])
        raise BlendIndexCompileError(
            f"cannot build the compiled blend index ({type(exc).__name__}: {cause}); "
            f"it needs a C++ compiler (c++, or $CXX) and ninja"
        ) from exc
    pointer = ctypes.c_void_p
    for name in ("nemotron_blend_int16", "nemotron_blend_int64"):
        function = getattr(library, name)
        function.argtypes = [pointer, pointer, ctypes.c_int64, ctypes.c_int64, pointer, pointer, pointer]
        function.restype = None
    return library


@functools.cache
def available() -> bool:
    """Whether the compiled blend index can be used here; the first time it cannot, a warning
    (logged) says why and that the Python loop is used instead."""
    try:
        load_library()
    except BlendIndexCompileError as exc:
        log.warning("%s: the blend index is built by the Python loop instead (slow for large blends)", exc)
        return False
    return True


def largest_deficit(
    weights: np.ndarray, ids: np.ndarray, dataset_index: np.ndarray, sample_index: np.ndarray
) -> None:
    """Fill dataset_index[size] (int16 or int64) and sample_index[size] (int64) in place by the
    largest-deficit rule on `weights` (float64, normalised, all > 0), dataset k of the rule being
    dataset ids[k]. Raises BlendIndexCompileError where the library cannot be built."""
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if weights.ndim != 1 or len(weights) == 0 or ids.shape != weights.shape:
        raise ValueError(f"weights {weights.shape} and ids {ids.shape} must be 1-D, non-empty, alike")
    size = len(sample_index)
    if dataset_index.shape != (size,) or sample_index.shape != (size,):
        raise ValueError(f"dataset_index {dataset_index.shape} and sample_index {sample_index.shape} differ")
    if sample_index.dtype != np.int64 or not (
        dataset_index.flags.c_contiguous and sample_index.flags.c_contiguous
    ):
        raise ValueError("sample_index must be int64 and both outputs contiguous")
    if not (dataset_index.flags.writeable and sample_index.flags.writeable):
        raise ValueError("the outputs must be writeable")
    library = load_library()
    if dataset_index.dtype == np.int16:
        if ids.max(initial=0) >= 2**15:
            raise ValueError(f"dataset id {int(ids.max())} does not fit an int16 index")
        function = library.nemotron_blend_int16
    elif dataset_index.dtype == np.int64:
        function = library.nemotron_blend_int64
    else:
        raise ValueError(f"dataset_index must be int16 or int64, not {dataset_index.dtype}")
    drawn = np.zeros(len(weights), dtype=np.int64)
    # ctypes releases the GIL for the call: other threads (a heartbeat, a logger) keep running.
    function(
        weights.ctypes.data,
        ids.ctypes.data,
        len(weights),
        size,
        dataset_index.ctypes.data,
        sample_index.ctypes.data,
        drawn.ctypes.data,
    )
