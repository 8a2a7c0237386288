"""Fit the performance model's constants (`nemotron.train.perf_model.Calibration`) to the
measured training runs in benchmarks/results and print how far each prediction is from its
measurement (tokens/s per GPU and peak allocated memory per GPU).

    .venv/bin/python benchmarks/calibrate_plan.py            # table with the package's constants
    .venv/bin/python benchmarks/calibrate_plan.py --fit      # refit, print the constants + table
    .venv/bin/python benchmarks/calibrate_plan.py --loo      # + leave-one-out errors

Rows: every multi-GPU run of benchmarks/results/*h200x*/results.jsonl (docs/benchmarks.md
"Multi-GPU") and the one-GPU runs of the same sessions plus the best one-GPU throughput run
(train-bf16-mb3-accum4-ovl_1325.json). Each row is predicted with the code it ran: the MoE block
time measured at that time (the fused routing kernel landed at 13:22) and the expert-parallel
dispatcher of that time ("legacy" before commit 2d78842, "sync" after). The fit minimises the
squared log errors of time and memory; `--loo` refits without each row in turn and predicts it
(an out-of-sample check: a constant only one row determines has no out-of-sample error).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from nemotron.models.nano3 import Nano3Config
from nemotron.train import perf_model as pm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# MoE block before the fused routing kernel (docs/benchmarks.md, 13:12 rows)
MOE_BEFORE_1322 = {"moe": 9.140, "moe_no_overlap": 9.063}
# rows measured after the fused routing kernel (the others of the 2x session ran before it)
AFTER_1322 = {"full14_dp2_acc", "full27_ep2"}
# the expert-parallel dispatcher each session ran (later sessions: the current one)
DISPATCHER = {"2026-11-29-h200x2": "legacy", "2026-11-29-h200x4": "sync"}


@dataclasses.dataclass
class Row:
    name: str
    session: str
    cfg: Nano3Config
    layout: pm.Layout
    shape: pm.RunShape
    tokens_per_second_per_gpu: float
    peak_allocated_gib: float
    block_ms: dict[str, float]

    @property
    def multi_gpu(self) -> bool:
        return self.layout.world > 1


def _parse_overrides(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        key, _, value = o.partition("=")
        out[key] = value
    return out


def _bool(v: str) -> bool:
    return v.strip().lower() == "true"


def load_rows() -> list[Row]:
    rows = []
    for path in sorted(RESULTS.glob("*h200x*/results.jsonl")):
        session = path.parent.name
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if "overrides" not in r or r.get("fake_world") or "tokens_per_second_per_gpu" not in r:
                continue  # microbenchmarks (ep_overlap, nccl) and one-GPU fake-world memory runs
            o = _parse_overrides(r["overrides"])
            cfg = Nano3Config(
                hybrid_pattern=o["model.hybrid_pattern"],
                num_layers=int(o["model.num_layers"]),
                num_experts=int(o["model.num_experts"]),
            )
            world = r["world_size"]
            layout = pm.Layout(
                world=world,
                tp=int(o["model.tensor_model_parallel_size"]),
                ep=int(o["model.expert_model_parallel_size"]),
                cp=int(o.get("model.context_parallel_size", 1)),
                micro_batch=int(o["train.micro_batch_size"]),
            )
            gb = int(o["train.global_batch_size"])
            accum = gb // (layout.micro_batch * layout.dp)
            weights = o.get("train.compute_weights", "auto")
            if weights == "auto":
                weights = "bf16" if (world > 1 or accum > 1) else "fp32"
            # the 2x session ran before the shared-expert overlap became the default (cde3239)
            default_overlap = session != "2026-11-29-h200x2"
            overlap = (
                _bool(o["train.moe_shared_expert_overlap"])
                if ("train.moe_shared_expert_overlap" in o)
                else default_overlap
            )
            shape = pm.RunShape(
                seq_length=8192,
                global_batch_size=gb,
                shared_expert_overlap=overlap,
                compute_weights=weights,
                ep_dispatcher=DISPATCHER.get(session, "overlap"),
            )
            block_ms = dict(pm.MEASURED_BLOCK_MS)
            if session == "2026-11-29-h200x2" and r["name"] not in AFTER_1322:
                block_ms.update(MOE_BEFORE_1322)
            peak = max(m["allocated_gib"] for m in r["peak_memory_per_gpu"])
            rows.append(
                Row(
                    f"{r['name']} ({world}x)" if world == 1 else r["name"],
                    session,
                    cfg,
                    layout,
                    shape,
                    r["tokens_per_second_per_gpu"],
                    peak,
                    block_ms,
                )
            )
    # the best one-GPU run (train_step directly, bf16 compute weights, mb 3 x 4, overlap)
    one = json.loads((RESULTS / "2026-11-29-h200" / "train-bf16-mb3-accum4-ovl_1325.json").read_text())
    a = one["args"]
    cfg = Nano3Config(
        hybrid_pattern=one["model"]["hybrid_pattern"], num_layers=a["layers"], num_experts=a["experts"]
    )
    rows.append(
        Row(
            "train_mb3x4_ovl (1x)",
            "2026-11-29-h200",
            cfg,
            pm.Layout(world=1, micro_batch=a["micro_batch"]),
            pm.RunShape(
                seq_length=a["seq"],
                global_batch_size=a["micro_batch"] * a["grad_accum"],
                shared_expert_overlap=True,
                compute_weights="bf16",
            ),
            one["run"]["tokens_per_s"],
            one["run"]["peak_gib"],
            dict(pm.MEASURED_BLOCK_MS),
        )
    )
    return rows


def predict(row: Row, cal: pm.Calibration) -> pm.Plan:
    cal = dataclasses.replace(cal, block_ms=row.block_ms)
    return pm.estimate(row.cfg, row.layout, row.shape, pm.H200, cal)


def errors(rows: list[Row], cal: pm.Calibration) -> list[tuple[float, float]]:
    out = []
    for row in rows:
        plan = predict(row, cal)
        out.append(
            (
                plan.tokens_per_second_per_gpu / row.tokens_per_second_per_gpu - 1,
                plan.memory.total / row.peak_allocated_gib - 1,
            )
        )
    return out


TIME_PARAMS = [
    "compute_scale",
    "micro_batch_overhead_s",
    "step_overhead_s",
    "optimizer_s_per_param",
    "fsdp_exposed",
    "a2a_exposed",
    "ep_dispatch_s.sync",
    "ep_dispatch_s.legacy",
    "tp_block_s",
    "cp_layer_s",
    "allocator_pressure_slowdown",
]
MEMORY_PARAMS = ["activation_scale", "loss_buffer_factor", "memory_overhead_gib"]


def _get(cal: pm.Calibration, name: str) -> float:
    if "." in name:
        top, key = name.split(".")
        return getattr(cal, top)[key]
    return getattr(cal, name)


def _set(cal: pm.Calibration, name: str, value: float) -> pm.Calibration:
    if "." in name:
        top, key = name.split(".")
        d = dict(getattr(cal, top))
        d[key] = value
        if top == "ep_dispatch_s" and key == "sync":
            d["overlap"] = value  # the overlapping dispatcher keeps one host sync per dispatch
        return dataclasses.replace(cal, **{top: d})
    return dataclasses.replace(cal, **{name: value})


def _loss(rows, cal, which: int) -> float:
    return sum(math.log1p(e[which]) ** 2 for e in errors(rows, cal))


def fit(rows: list[Row], cal: pm.Calibration, rounds: int = 30) -> pm.Calibration:
    """Coordinate descent on multiplicative steps (every constant is >= 0)."""
    for which, params in ((0, TIME_PARAMS), (1, MEMORY_PARAMS)):
        best = _loss(rows, cal, which)
        step = 0.5
        for _ in range(rounds):
            improved = False
            for name in params:
                value = _get(cal, name)
                candidates = [value * (1 + step), value / (1 + step)]
                if name == "memory_overhead_gib":
                    candidates = [value + step * 2, value - step * 2]
                for c in candidates:
                    trial = _set(cal, name, c)
                    loss = _loss(rows, trial, which)
                    if loss < best - 1e-12:
                        best, cal, improved = loss, trial, True
                        break
            if not improved:
                step /= 2
                if step < 1e-3:
                    break
    return cal


def table(rows: list[Row], cal: pm.Calibration, loo: dict[str, tuple[float, float]] | None = None) -> str:
    head = (
        "| run | GPUs | layout | measured tokens/s/GPU | predicted | error | measured peak GiB "
        "| predicted | error |" + (" held-out error (tokens/s, GiB) |" if loo else "")
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row, (et, em) in zip(rows, errors(rows, cal)):
        plan = predict(row, cal)
        flag = lambda e: f"{e:+.1%}" + ("" if abs(e) <= 0.15 else " **>15%**")
        line = (
            f"| `{row.name}` | {row.layout.world} | {row.layout.describe()} x"
            f"{plan.grad_accumulation} | {row.tokens_per_second_per_gpu:,.0f} | "
            f"{plan.tokens_per_second_per_gpu:,.0f} | {flag(et)} | {row.peak_allocated_gib:.1f} | "
            f"{plan.memory.total:.1f} | {flag(em)} |"
        )
        if loo:
            lt, lm = loo[row.name]
            line += f" {lt:+.1%}, {lm:+.1%} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit", action="store_true", help="refit the constants first")
    parser.add_argument("--loo", action="store_true", help="leave-one-out errors (slow)")
    parser.add_argument("--json", type=Path, help="write the rows and errors here")
    args = parser.parse_args(argv)
    rows = load_rows()
    cal = pm.CALIBRATION
    if args.fit:
        cal = fit(rows, cal)
        fields = {f.name: getattr(cal, f.name) for f in dataclasses.fields(cal) if f.name != "block_ms"}
        print("fitted constants:")
        for k, v in fields.items():
            print(f"  {k} = {v!r}")
    loo = None
    if args.loo:
        loo = {}
        for i, row in enumerate(rows):
            rest = rows[:i] + rows[i + 1 :]
            held = fit(rest, cal, rounds=15)
            loo[row.name] = errors([row], held)[0]
    print(table(rows, cal, loo))
    errs = errors(rows, cal)
    multi = [e for r, e in zip(rows, errs) if r.multi_gpu]
    print(
        f"\nmulti-GPU rows: {len(multi)}; within 15%: tokens/s "
        f"{sum(abs(e[0]) <= 0.15 for e in multi)}, memory {sum(abs(e[1]) <= 0.15 for e in multi)}; "
        f"max |error| tokens/s {max(abs(e[0]) for e in multi):.1%}, memory "
        f"{max(abs(e[1]) for e in multi):.1%}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "name": r.name,
                        "world": r.layout.world,
                        "layout": r.layout.describe(),
                        "measured_tps": r.tokens_per_second_per_gpu,
                        "measured_gib": r.peak_allocated_gib,
                        "error_tps": e[0],
                        "error_gib": e[1],
                    }
                    for r, e in zip(rows, errs)
                ],
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
