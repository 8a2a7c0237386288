"""Helpers shared by the GPU benchmarks: timing, the machine's two ceilings, the software
description, and appending result rows to docs/benchmarks.md.

Imports only torch (Triton is not needed), so the CPU smoke tests can import it.
"""

from __future__ import annotations

import datetime as _dt
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from nemotron.utils.fs import atomic_write_text

# The Nano3 proxy's structure at small widths, for the CPU smoke tests of the benchmarks.
TINY_SIZES = dict(
    hidden_size=64,
    vocab_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    mamba_num_heads=4,
    mamba_head_dim=16,
    mamba_state_size=16,
    mamba_num_groups=2,
    mamba_chunk_size=16,
    moe_ffn_hidden_size=32,
    moe_shared_expert_hidden_size=48,
    num_experts=8,
    moe_top_k=2,
)


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def environment(device: torch.device) -> dict:
    """What ran the benchmark: GPU (or CPU), torch / triton / Python versions."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "date": now_utc()}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # Triton is optional on CPU machines
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = props.name
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()})"
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(
    fn: Callable[[], object], device: torch.device, warmup: int, iters: int, sync_each: bool = False
) -> list[float]:
    """Time of each of `iters` calls of `fn()` in milliseconds.

    On a GPU the calls run back to back between CUDA events and synchronise once at the end
    (as triton.testing.do_bench does): the CPU queues the next call's kernels while the GPU runs,
    as it does in a training loop, so each time is GPU execution, not kernel-launch latency.
    `sync_each=True` waits for every call before launching the next (the latency of one call
    from an idle GPU, launch gaps included)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type != "cuda":
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        if sync_each:
            end.synchronize()
        events.append((start, end))
    synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ceilings(device: torch.device) -> dict:
    """The two ceilings measured on this device: device-to-device copy bandwidth (bytes read +
    written) and a large bf16 matrix product, on random data (METHOD.md)."""
    if device.type != "cuda":
        return {"copy_GBps": None, "bf16_matmul_TFLOPs": None}
    x = torch.randn(2**29, device=device)  # 2 GiB
    y = torch.empty_like(x)
    t = median(time_ms(lambda: y.copy_(x), device, 5, 20))
    copy = 2 * x.numel() * 4 / (t * 1e-3)
    x = y = None  # free the 4 GiB before the matmul (rebinding: the lambdas above are done)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = median(time_ms(lambda: a @ b, device, 5, 20))
    mm = 2 * 8192**3 / (t * 1e-3)
    a = b = None
    torch.cuda.empty_cache()
    return {"copy_GBps": copy / 1e9, "bf16_matmul_TFLOPs": mm / 1e12}


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """CUDA memory one call of `fn` allocates at its peak beyond what was allocated before it
    (MiB), after one warm-up call (autotuning, caches)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def append_table_row(
    path: str | Path, section: str, header: list[str], row: list[str], intro: str = ""
) -> None:
    """Append `row` to the table under `## section` of a Markdown file, creating the section
    (heading, optional intro paragraph, table header) at the end of the file if it is missing.
    Writes to a temporary name and renames, so the file is never half-written."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    line = "| " + " | ".join(row) + " |"
    lines = text.rstrip("\n").split("\n")
    heading = f"## {section}"
    if heading not in lines:
        block = ["", heading, ""]
        if intro:
            block += [intro, ""]
        block += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), line]
        lines += block
    else:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        table_rows = [i for i in range(start, end) if lines[i].startswith("|")]
        if table_rows:
            insert_at = table_rows[-1] + 1
        else:
            lines[end:end] = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            insert_at = end + 2
        lines.insert(insert_at, line)
    atomic_write_text(path, "\n".join(lines) + "\n")
