"""Blend sample-index build: the Python rule vs the compiled loop, and the projected first start
of the recipe's blend (3.05e9 samples = 25T tokens / 8192, 25 datasets) with a cold cache.

Weights: 25 Dirichlet(0.5) shares (+0.1%) as a stand-in for the recipe's, seed 0. Each path is
timed through `blended.build_blending_indices` (array allocation included), best of --repeats;
the compiled library's build (first use on a machine, then cached) is timed apart, in a fresh
TORCH_EXTENSIONS_DIR.

    PYTHONPATH=src .venv/bin/python benchmarks/blend_index.py
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

RECIPE_SAMPLES = 3.05e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=25)
    parser.add_argument("--python-samples", type=int, default=200_000)
    parser.add_argument("--compiled-samples", type=int, default=50_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    # A fresh extensions directory: the build timed is a first use, not a cached load.
    os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="blend-index-ext-")
    from nemotron.data import blend_index
    from nemotron.data.blended import build_blending_indices

    start = time.perf_counter()
    from torch.utils import cpp_extension  # noqa: F401 - its import is part of the first-use cost

    imported = time.perf_counter() - start
    start = time.perf_counter()
    blend_index.load_library()
    built = time.perf_counter() - start

    weights = (np.random.default_rng(0).dirichlet(np.full(args.datasets, 0.5)) + 1e-3).tolist()

    def best(size: int, compiled: bool) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            build_blending_indices(weights, size, compiled=compiled)
            times.append(time.perf_counter() - start)
        return min(times) / size * 1e6

    python_us = best(args.python_samples, False)
    compiled_us = best(args.compiled_samples, True)
    check = build_blending_indices(weights, args.python_samples, compiled=True)
    want = build_blending_indices(weights, args.python_samples, compiled=False)
    same = all(np.array_equal(a, b) for a, b in zip(check, want))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}"
    )
    print(f"datasets {args.datasets}; identical on {args.python_samples:,} samples: {same}")
    print(f"compiled library: import cpp_extension {imported:.2f} s, build {built:.2f} s (first use)")
    for name, us in (("python", python_us), ("compiled", compiled_us)):
        projected = us * RECIPE_SAMPLES / 1e6
        print(f"{name:9s} {us:8.4f} us/sample -> {projected / 60:8.1f} min at {RECIPE_SAMPLES:.3g} samples")
    print(
        f"speed-up {python_us / compiled_us:.0f}x; index arrays at recipe scale: {RECIPE_SAMPLES * 10 / 1e9:.1f} GB"
    )


if __name__ == "__main__":
    main()
