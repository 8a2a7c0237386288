"""Markdown table of `multi_gpu_proxy.sh` results (issue 10): per-GPU throughput, MFU, memory,
and loss parity of every run against the one-GPU run with the same global batch and model.

    python3 benchmarks/multi_gpu_report.py results.jsonl [--steps 3] [--tol 2e-3]

Parity: a run is compared with the one-GPU run (world size 1) whose overrides are equal once
the layout keys (TP/EP/CP sizes, sequence parallel, compute weights, overlap) are left out; the
first `--steps` losses must agree within `--tol` (bf16 compute: the order of reductions differs
across layouts, so bit equality is not expected). Exit status 1 if any comparable run fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LAYOUT_KEYS = (
    "model.tensor_model_parallel_size",
    "model.expert_model_parallel_size",
    "model.context_parallel_size",
    "model.sequence_parallel",
    "train.compute_weights",
    "train.moe_shared_expert_overlap",
)


def _workload(run: dict) -> tuple:
    """The overrides that define the model and the global batch (last value of each key wins)."""
    values = dict(o.split("=", 1) for o in run["overrides"])
    return tuple(sorted((k, v) for k, v in values.items() if k not in LAYOUT_KEYS))


def report(runs: list[dict], steps: int, tol: float) -> tuple[str, bool]:
    singles = {_workload(r): r for r in runs if r["world_size"] == 1}
    lines = [
        "| run | GPUs | tokens/s per GPU | MFU | peak allocated / reserved per GPU (GiB) "
        f"| max loss diff vs 1 GPU, steps 1-{steps} |",
        "|---|---|---|---|---|---|",
    ]
    ok = True
    for r in runs:
        ref = singles.get(_workload(r))
        if r["world_size"] == 1 or ref is None:
            parity = "-"
        else:
            diff = max(abs(a - b) for a, b in zip(r["losses"][:steps], ref["losses"][:steps]))
            passed = diff <= tol
            ok &= passed
            parity = f"{diff:.1e} vs `{ref['name']}` ({'pass' if passed else 'FAIL'})"
        # Each column's own peak over the GPUs: the GPU with most allocated need not be the one
        # with most reserved (one row read 127.9 reserved where another GPU reserved 131.3).
        allocated = max(m["allocated_gib"] for m in r["peak_memory_per_gpu"])
        reserved = max(m["reserved_gib"] for m in r["peak_memory_per_gpu"])
        lines.append(
            f"| `{r['name']}` | {r['world_size']} | {r['tokens_per_second_per_gpu']:,.0f} "
            f"| {r['mfu']:.3f} | {allocated:.1f} / {reserved:.1f} | {parity} |"
        )
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="results.jsonl file(s)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tol", type=float, default=2e-3)
    args = parser.parse_args(argv)
    runs = [
        json.loads(line) for path in args.results for line in path.read_text().splitlines() if line.strip()
    ]
    table, ok = report(runs, args.steps, args.tol)
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
