"""Training throughput of the Nano3 proxy on one GPU, through the project's own training step
(issue 8).

The proxy is the first 14 blocks of the Nano3 pattern (`MEMEM*EMEMEM*E`: 6 Mamba-2, 6 MoE,
2 attention) at every Nano3 width, 64 routed experts (top-6, shared expert kept), vocab 131072.
Each timed step is `train.trainer.Trainer.step()`, exactly what `nemotron.train.pretrain` runs
per step: the loader's next batches (synthetic tokens, or a real `blend.json`),
`train.loop.train_step` (forward and backward per micro-batch, gradient norm and clipping, fused
AdamW) and the expert-bias update, then a device synchronisation.

Parameter modes (`--params`):
- `fp32` (default): `train.loop.build_model`'s single-process model: fp32 parameters (the
  master weights) cast by bf16 autocast inside every forward;
- `bf16`: fp32 master weights and AdamW state, bf16 compute weights: FSDP2's mixed-precision
  policy on a one-GPU mesh, i.e. `train.compute_weights=bf16` of the library
  (`train.loop.build_model` in a one-rank process group, as the multi-GPU path does). With
  gradient accumulation the weights are gathered and the gradients reduced once per step
  (`train.fsdp_accumulate_unsharded`, on by default in `train_step`).

Reported: tokens/s, step time, model TFLOP/s and MFU against 989 TFLOP/s (`train/flops.py`, the
formula training logs use), peak memory, and a split of one step's GPU time by block type
(CUDA events at block boundaries in forward and backward, plus the optimizer step) with the
peak of allocated memory within each of those phases (`peak_gib_by_phase`: where the step's
peak is), and the top kernels from a `torch.profiler` pass (`PROFILE_TOP` of them, default
25), with the profiled step's GPU busy time against its span (idle: where the step waits on
the CPU; the kernels each idle interval ended before, longest total first, and the idle time
by the phase of `train_step` the host was in when the GPU resumed), the operators with
the most host time of their own, and, for the kernel-name substrings in `PROFILE_ATTRIBUTE`
(comma list), their time by the operators that launched them; `PROFILE_TRACE=FILE[.gz]` writes
the profiled step's whole trace (Chrome trace format). `SKIP_GUARD_EVAL=1` (an
experiment) times the steps after the warm-up with compiled regions skipping their guards
(`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`). `--check-numerics N` compares the loss of the first N
steps with the reference path (fp32 weights, PyTorch reference kernels, full-logits loss) on the
same data. `--peer hf` also trains the same proxy through transformers' `NemotronHForCausalLM`
(same tokens per optimizer step, AdamW groups, clipping and bf16 autocast; at sequence 4096
if the peer runs out of memory at `--seq`; each side at the largest micro batch that fits, the
accumulation keeping the tokens per step equal) and prints the tokens/s ratio.

    PYTHONPATH=src python3 benchmarks/train_throughput.py --out tt.json [--append-row docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import TINY_SIZES, append_table_row, environment, median, peak_memory_gib, synchronize  # noqa: E402

from nemotron.config.schema import ModelConfig, PretrainConfig  # noqa: E402
from nemotron.data.config import DataConfig  # noqa: E402
from nemotron.distributed.utils import launcher_process_group  # noqa: E402
from nemotron.kernels import fast_paths  # noqa: E402
from nemotron.models.nano3.config import NANO3_PATTERN  # noqa: E402
from nemotron.train import flops  # noqa: E402
from nemotron.train.config import OptimizerConfig, SchedulerConfig, TrainConfig  # noqa: E402
from nemotron.train.data import TrainingData, plan_batches  # noqa: E402
from nemotron.train.fp8 import RECIPES as FP8_RECIPES  # noqa: E402
from nemotron.train.fp8 import Fp8Config  # noqa: E402
from nemotron.train.fp8_config import (  # noqa: E402
    EXPERT_GROUPED_GEMMS,
    experts_float32_grads_problem,
    grouped_tiles_problem,
)
from nemotron.train.loop import STEP_PHASE_PREFIX, Parallel, build_model  # noqa: E402
from nemotron.train.trainer import Trainer  # noqa: E402


def proxy_model_config(num_layers: int = 14, num_experts: int = 64, tiny: bool = False) -> ModelConfig:
    """The Nano3 proxy: the first `num_layers` blocks of the Nano3 pattern, Nano3 widths."""
    sizes = dict(TINY_SIZES) if tiny else {"num_experts": num_experts}
    return ModelConfig(hybrid_pattern=NANO3_PATTERN[:num_layers], num_layers=num_layers, **sizes)


def pretrain_config(args, seq: int, micro_batch: int, grad_accum: int | None = None) -> PretrainConfig:
    model = proxy_model_config(args.layers, args.experts, args.tiny)
    steps = args.warmup + args.steps + 2  # + the profiled step and spare
    train = TrainConfig(
        train_iters=steps,
        global_batch_size=micro_batch * (grad_accum or args.grad_accum),
        micro_batch_size=micro_batch,
        seq_length=seq,
        seed=1234,
        eval_iters=0,
        precision="bf16",
        device=args.device,
        grad_clip=1.0,
        fused_kernels=True,
        activation_recompute=args.recompute,
        moe_shared_expert_overlap=args.shared_expert_overlap,
        experts_float32_grads=args.experts_float32_grads,
        fp8=fp8_config(args),
    )
    data = DataConfig(blend=args.blend, mock=args.blend is None)
    # A constant learning rate: the timed steps run at --lr (the recipe's WSD would still be
    # warming up from 0 after a few steps).
    return PretrainConfig(
        model=model,
        train=train,
        data=data,
        optimizer=OptimizerConfig(lr=args.lr, min_lr=args.lr),
        scheduler=SchedulerConfig(style="constant"),
    )


def fp8_config(args) -> Fp8Config:
    """`train.fp8` from `--fp8 RECIPE` (`off`: disabled) and `--fp8-layers`."""
    if args.fp8 == "off":
        return Fp8Config()
    layers = args.fp8_layers.split(",") if args.fp8_layers else Fp8Config().layers
    return Fp8Config(
        enabled=True,
        recipe=args.fp8,
        layers=layers,
        compile=not args.fp8_eager,
        autotune_casts=args.fp8_autotune_casts,
        reuse_weights=args.fp8_reuse,
        lm_head_group_rows=args.fp8_lm_head_group_rows,
        fsdp_float8_all_gather=args.fp8_all_gather,
        experts_fsdp_float8_all_gather=args.fp8_experts_gather,
        fast_accum=args.fp8_fast_accum,
        experts_weight_grad="fp8" if args.fp8_experts_wgrad else "bf16",
        experts_grouped_gemm=args.fp8_experts_gemm,
        experts_grouped_tiles=args.fp8_experts_tiles,
    )


def grouped_tiles_arg(text: str) -> list[int]:
    """`--fp8-experts-tiles`: "BLOCK_M,BLOCK_N,BLOCK_K,stages,warps,use_tma,persistent" (the form
    `benchmarks/fp8_gemms.py --parts grouped_triton` prints as its best), checked by the one
    validator of `train.fp8.experts_grouped_tiles`."""
    try:
        tiles = [int(v) for v in text.replace("[", "").replace("]", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"integers separated by commas expected, got {text!r}") from None
    problem = grouped_tiles_problem(tiles)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return tiles


# ---------------------------------------------------------------------------------------------
# Model construction


def build(cfg: PretrainConfig, device: torch.device, params: str) -> tuple[nn.Module, Parallel]:
    """The library's model for `train.compute_weights=params` (bf16: inside `one_rank_group`)."""
    if params not in ("bf16", "fp32"):
        raise ValueError(f"--params must be bf16 or fp32, got {params!r}")
    return build_model(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compute_weights=params)), device
    )


def one_rank_group(device: torch.device, params: str):
    """The one-rank process group bf16 compute weights need (FSDP2 on a one-GPU mesh)."""
    return launcher_process_group(device.type, one_rank=params == "bf16")


# ---------------------------------------------------------------------------------------------
# Timing of one step by block type


def _block_kind(layer: nn.Module) -> str:
    inner = getattr(layer, "_checkpoint_wrapped_module", layer)
    return inner.kind


class CudaPeakMemory:
    """The caching allocator's peak of allocated memory on `device` since the last restart."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def restart(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


class StepSplit:
    """Records device events at block boundaries (forward: around each block; backward: when
    the gradient of the block's output arrives and when that of its input is complete) and
    around the optimizer step; `end()` attributes one step's time to block kinds, and `peaks`
    holds the highest allocated memory within each phase (`memory`: a `CudaPeakMemory` on
    CUDA, None elsewhere)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        memory: CudaPeakMemory | None = None,
    ):
        self.device = device
        self.active = False
        self.spans: list[tuple[str, object, object]] = []
        self.handles = []
        for layer in model.backbone.layers.values():
            kind = _block_kind(layer)
            self.handles.append(layer.register_forward_pre_hook(self._pre(kind)))
            self.handles.append(layer.register_forward_hook(self._post(kind)))
        self.handles.append(optimizer.register_step_pre_hook(self._opt_pre))
        self.handles.append(optimizer.register_step_post_hook(self._opt_post))
        self._pending: dict[int, tuple] = {}
        # the highest allocated GiB within each phase (the intervals between hooks), read from
        # the caching allocator's host-side counters (no device sync): where the step's peak is
        self.peaks: dict[str, float] = {}
        if memory is None and device.type == "cuda":
            memory = CudaPeakMemory(device)
        self.memory = memory

    def _peak_since_last(self, label: str) -> None:
        """Charge the allocator's peak since the previous hook to `label` and restart it."""
        if self.memory is None:
            return
        gib = self.memory.peak_gib()
        self.peaks[label] = max(self.peaks.get(label, 0.0), gib)
        self.memory.restart()

    def _event(self):
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        import time

        return time.perf_counter()

    @staticmethod
    def _elapsed_ms(a, b) -> float:
        if isinstance(a, float):
            return (b - a) * 1e3
        return a.elapsed_time(b)

    def _recording(self) -> bool:
        return self.active and torch._C._current_graph_task_id() == -1  # not in a recompute

    def _pre(self, kind):
        def hook(module, args):
            if not self._recording():
                return
            self._peak_since_last("outside blocks (forward)")
            module._split_fwd_start = self._event()
            x = args[0]
            if x.requires_grad:
                key = id(module)

                def input_grad_done(grad):
                    start = self._pending.pop(key, None)
                    if start is not None:
                        self._peak_since_last(f"{kind}/bwd")
                        self.spans.append((f"{kind}/bwd", start, self._event()))

                x.register_hook(input_grad_done)

        return hook

    def _post(self, kind):
        def hook(module, args, out):
            if not self._recording():
                return
            self._peak_since_last(f"{kind}/fwd")
            self.spans.append((f"{kind}/fwd", module._split_fwd_start, self._event()))
            y = out[0] if isinstance(out, tuple) else out
            if y.requires_grad:
                key = id(module)

                def output_grad_arrived(grad):
                    self._peak_since_last("outside blocks (backward)")
                    self._pending[key] = self._event()

                y.register_hook(output_grad_arrived)

        return hook

    def _opt_pre(self, optimizer, args, kwargs):
        if self.active:
            self._peak_since_last("outside blocks (backward)")
            self._opt_start = self._event()

    def _opt_post(self, optimizer, args, kwargs):
        if self.active:
            self._peak_since_last("optimizer")
            self.spans.append(("optimizer", self._opt_start, self._event()))

    def begin(self):
        self.spans.clear()
        self._pending.clear()
        self.peaks.clear()
        if self.memory is not None:
            self.memory.restart()
        self.active = True
        self.step_start = self._event()

    def end(self) -> dict:
        self.step_end = self._event()
        self._peak_since_last("after the optimizer")
        self.active = False
        synchronize(self.device)
        total = self._elapsed_ms(self.step_start, self.step_end)
        out: dict[str, float] = {}
        for label, a, b in self.spans:
            out[label] = out.get(label, 0.0) + self._elapsed_ms(a, b)
        out["other (embedding, LM head + loss, grad norm/clip, balancing, launch gaps)"] = total - sum(
            out.values()
        )
        out["total"] = total
        return {k: round(v, 3) for k, v in out.items()}

    def remove(self):
        for h in self.handles:
            h.remove()


PROFILE_TOP = int(os.environ.get("PROFILE_TOP", "25"))  # kernels kept from the profiled step
# comma list of kernel-name substrings: their time in the profiled step by the operators that
# launched them (what a kernel is for, when its name does not say)
PROFILE_ATTRIBUTE = [p for p in os.environ.get("PROFILE_ATTRIBUTE", "").split(",") if p]
# an experiment: after the warm-up steps, compiled regions skip their guards except those that
# tell their compiled versions apart (`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`)
SKIP_GUARD_EVAL = os.environ.get("SKIP_GUARD_EVAL", "") == "1"
# a file to write the profiled step's trace to (Chrome trace format, gzip-compressed when the
# name ends in .gz): every kernel with its stream, for what the summaries above leave out
PROFILE_TRACE = os.environ.get("PROFILE_TRACE", "")
GAP_TOP = 20  # the kernels before which the profiled step's GPU waited longest, kept


def top_cpu_ops(prof, limit: int = 25) -> list[dict]:
    """The operators (and Python-level ranges the profiler records) with the most host time of
    their own in the profiled step: where the CPU spends a launch-bound step."""
    rows = [
        {"name": evt.key[:120], "self_cpu_ms": evt.self_cpu_time_total / 1e3, "calls": evt.count}
        for evt in prof.key_averages()
        if evt.self_cpu_time_total > 0
    ]
    rows.sort(key=lambda r: -r["self_cpu_ms"])
    return rows[:limit]


def top_kernels(prof, limit: int = 25) -> list[dict]:
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0)
        if t and t > 0:
            rows.append({"name": evt.key[:120], "ms": t / 1e3, "calls": evt.count})
    rows.sort(key=lambda r: -r["ms"])
    return rows[:limit]


# the CUDA runtime and driver calls a kernel's launch is recorded under (their parent is the
# operator that launched it)
_RUNTIME_CALLS = ("cuda", "cuLaunch")


def attribute_kernels(prof, patterns: list[str], limit: int = 12) -> dict:
    """{pattern: [{ops, shapes, ms, calls}]}: the device time of the kernels whose names contain
    `pattern`, grouped by the chain of operators that launched them (innermost first, four
    levels) and the launching operator's input shapes."""
    out: dict[str, dict] = {p: {} for p in patterns}
    for evt in prof.events():
        kernels = getattr(evt, "kernels", None) or []
        for kernel in kernels:
            for pattern in patterns:
                if pattern not in kernel.name:
                    continue
                chain, parent = [], evt
                while parent is not None and len(chain) < 5:
                    if not parent.name.startswith(_RUNTIME_CALLS):
                        chain.append(parent.name[:60])
                    parent = parent.cpu_parent
                op = evt.cpu_parent if evt.name.startswith(_RUNTIME_CALLS) else evt
                shapes = str(getattr(op, "input_shapes", "") or "")[:120]
                key = (" < ".join(chain[:4]), shapes)
                row = out[pattern].setdefault(key, {"ops": key[0], "shapes": shapes, "ms": 0.0, "calls": 0})
                row["ms"] += kernel.duration / 1e3
                row["calls"] += 1
    return {p: sorted(rows.values(), key=lambda r: -r["ms"])[:limit] for p, rows in out.items()}


def device_busy(prof) -> dict:
    """How much of the profiled step the GPU spent running kernels and copies: the union of
    their intervals on any stream (overlapping streams count once) against the span from the
    first to the last. Idle time inside the span is the launch-bound part of the step."""
    from torch.autograd import DeviceType

    events = list(prof.events())
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    if not spans:
        return {}
    # the step's phases as the host went through them (`train.loop.step_phase` ranges)
    phases = sorted(
        (e.time_range.start, e.time_range.end, e.name[len(STEP_PHASE_PREFIX) :])
        for e in events
        if e.device_type != DeviceType.CUDA and e.name.startswith(STEP_PHASE_PREFIX)
    )
    phase_starts = [start for start, _, _ in phases]

    def phase_at(t: float) -> str:
        i = bisect.bisect_right(phase_starts, t) - 1
        return phases[i][2] if i >= 0 and phases[i][1] >= t else "outside the phases"

    # idle intervals by the kernel that ended them (what the GPU waited for the CPU to launch)
    # and by the phase the host was in when it launched that kernel (the gap's end: an idle
    # GPU starts a kernel as soon as it is launched)
    waited: dict[str, list[float]] = {}
    by_phase: dict[str, float] = {}
    busy, cur_start, cur_end = 0.0, spans[0][0], spans[0][1]
    for start, end, name in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            idle_ms = (start - cur_end) / 1e3
            row = waited.setdefault(name[:80], [0.0, 0])
            row[0] += idle_ms
            row[1] += 1
            phase = phase_at(start)
            by_phase[phase] = by_phase.get(phase, 0.0) + idle_ms
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    span = spans[-1][1] - spans[0][0]
    gaps = [
        {"before": name, "idle_ms": round(ms, 3), "gaps": count}
        for name, (ms, count) in sorted(waited.items(), key=lambda kv: -kv[1][0])[:GAP_TOP]
    ]
    return {
        "busy_ms": busy / 1e3,
        "span_ms": span / 1e3,
        "idle_ms": (span - busy) / 1e3,
        "gaps": gaps,
        "idle_by_phase": {k: round(v, 3) for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])},
    }


# ---------------------------------------------------------------------------------------------
# Runs


@dataclasses.dataclass
class RunResult:
    name: str
    params: str
    seq: int
    micro_batch: int
    grad_accum: int
    tokens_per_step: int
    step_ms: float
    step_ms_all: list
    tokens_per_s: float
    tflops: float
    mfu: float
    peak_gib: float | None
    losses: list
    # the caching allocator under pressure: peak reserved GiB and how often a cudaMalloc failed
    # and was retried after freeing cached blocks (each retry synchronizes the device)
    allocator: dict | None = None
    split_ms: dict | None = None
    # the profiled step's highest allocated GiB within each phase (StepSplit.peaks)
    peak_gib_by_phase: dict | None = None
    kernels: list | None = None
    # the profiled step's GPU time: busy (kernels on any stream), span, idle within the span
    device_busy: dict | None = None
    attributed: dict | None = None  # PROFILE_ATTRIBUTE's kernels by launching operators
    # what train.fp8 converted (`Fp8Summary`: linears, expert groups, LM head, FP8 dispatch,
    # what was left in higher precision and why, emulated or not): the evidence behind the name
    fp8: dict | None = None
    error: str | None = None


def _batches_to_device(batches, device):
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def run_training(
    cfg: PretrainConfig,
    device: torch.device,
    params: str,
    steps: int,
    warmup: int,
    profile: bool,
    model_and_parallel=None,
    name: str = "nemotron",
) -> RunResult:
    """Build the model (unless given), then time `warmup + steps` steps of the library's
    `Trainer.step()` (batches, `train_step`, expert-bias update) plus a device sync."""
    model, parallel = model_and_parallel or build(cfg, device, params)
    arch = cfg.model.arch()
    plan = plan_batches(cfg.train, 1)
    data = TrainingData(cfg.data, cfg.train, plan, cfg.model.vocab_size, 0)
    trainer = Trainer(cfg, model, parallel, data, device=device)
    optimizer = trainer.optimizer
    fp8_summary = getattr(model, "fp8_summary", None)  # set by apply_fp8_if_enabled
    times, losses = [], []
    import time

    def one_step():
        t0 = time.perf_counter()
        res = trainer.step().result
        synchronize(device)
        return (time.perf_counter() - t0) * 1e3, res

    for i in range(warmup + steps):
        if i == warmup and SKIP_GUARD_EVAL:
            # every compiled region has been compiled for this run's shapes by now
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        ms, res = one_step()
        losses.append(res.lm_loss)
        if i >= warmup:
            times.append(ms)
    # the timed steps' memory, read before the split pass below restarts the peak counters
    peak = peak_memory_gib(device)
    allocator = None
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        allocator = {
            "peak_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / 2**30,
            "alloc_retries": stats.get("num_alloc_retries", 0),
            "device_alloc_calls": stats.get("num_device_alloc", 0),
        }
    split = kernels = busy = attributed = peaks = None
    if profile and hasattr(model, "backbone"):
        splitter = StepSplit(model, optimizer, device)
        splitter.begin()
        one_step()
        split = splitter.end()
        peaks = {k: round(v, 2) for k, v in splitter.peaks.items()} or None
        splitter.remove()
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(
                activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                record_shapes=bool(PROFILE_ATTRIBUTE),
            ) as prof:
                one_step()
            kernels = top_kernels(prof, PROFILE_TOP)
            busy = device_busy(prof)
            busy["cpu_ops"] = top_cpu_ops(prof, PROFILE_TOP)
            busy["cpu_total_ms"] = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
            if PROFILE_ATTRIBUTE:
                attributed = attribute_kernels(prof, PROFILE_ATTRIBUTE)
            if PROFILE_TRACE:
                prof.export_chrome_trace(PROFILE_TRACE)
    if SKIP_GUARD_EVAL:
        torch.compiler.set_stance("default")
    step_ms = median(times)
    tps = plan.tokens_per_step / (step_ms * 1e-3)
    fpt = flops.training_flops_per_token(arch, plan.seq_length)
    result = RunResult(
        name=name,
        params=params,
        seq=plan.seq_length,
        micro_batch=plan.micro_batch_size,
        grad_accum=plan.grad_accumulation,
        tokens_per_step=plan.tokens_per_step,
        step_ms=step_ms,
        step_ms_all=[round(t, 2) for t in times],
        tokens_per_s=tps,
        tflops=tps * fpt / 1e12,
        mfu=flops.mfu(tps, arch, plan.seq_length),
        peak_gib=peak,
        allocator=allocator,
        losses=losses,
        split_ms=split,
        peak_gib_by_phase=peaks,
        kernels=kernels,
        device_busy=busy,
        attributed=attributed,
        fp8=None if fp8_summary is None else dataclasses.asdict(fp8_summary),
    )
    trainer.close()
    model = optimizer = data = trainer = None  # free the run's memory before the next one
    return result


def _release(device: torch.device) -> None:
    # A GPU run's reference cycles hold device memory the next run needs, so they are collected
    # now; on the CPU (the smoke tests) Python's own collections free them, and a forced one costs
    # ~0.3 s with torch loaded.
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def check_numerics(args, device: torch.device, steps: int) -> dict:
    """Losses of the first `steps` steps: fast path (the benchmarked mode) vs the reference path
    (fp32 weights under bf16 autocast, PyTorch reference kernels, full-logits loss, per-expert
    MoE loop) from the same initial weights on the same tokens."""
    seq = args.seq
    cfg = pretrain_config(args, seq, args.micro_batch)
    fast = run_training(cfg, device, args.params, steps, 0, False, name="fast").losses
    _release(device)
    ref_cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, fused_kernels=False, fp8=Fp8Config())
    )
    with fast_paths(False):
        ref = run_training(ref_cfg, device, "fp32", steps, 0, False, name="reference").losses
    _release(device)
    diffs = [abs(a - b) for a, b in zip(fast, ref)]
    return {
        "steps": steps,
        "fast_losses": fast,
        "reference_losses": ref,
        "max_abs_diff": max(diffs),
        "tolerance": args.numerics_tol,
        "ok": max(diffs) <= args.numerics_tol,
    }


# ---------------------------------------------------------------------------------------------
# The transformers peer


class HFPeer(nn.Module):
    """transformers' `NemotronHForCausalLM` behind the interface `train_step` calls: the loss is
    the mean token cross-entropy of its logits (upcast to fp32, as transformers' own loss does)
    against our already-shifted labels."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids, labels=None, loss_mask=None, padding_mask=None):
        # `padding_mask` (mixed-length micro-batches) keeps padding out of our MoE balancing
        # statistics; transformers' model keeps none, and padding's labels are -100 here too.
        from nemotron.models.nano3.model import Nano3Output

        logits = self.hf(input_ids=input_ids).logits
        token_loss = nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.reshape(-1), reduction="none"
        )
        w = loss_mask.reshape(-1).float()
        loss = (token_loss * w).sum() / w.sum().clamp(min=1.0)
        return Nano3Output(loss=loss, lm_loss=loss, aux_loss=None, logits=None)


def build_hf_peer(cfg: PretrainConfig, device: torch.device) -> tuple[nn.Module, Parallel]:
    from transformers import NemotronHForCausalLM

    from nemotron.models.nano3.hf import to_hf_config

    hf_cfg = to_hf_config(cfg.model.arch(), dtype=torch.float32)
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        model = NemotronHForCausalLM(hf_cfg)
    model.float()
    return HFPeer(model), Parallel()


def run_peer(args, device: torch.device, ours: dict[int, RunResult]) -> dict:
    """Train the proxy through transformers with the same tokens per optimizer step as our run
    (`seq x micro batch x accumulation`), at `args.seq` or, if the peer runs out of memory there,
    4096; at each length the peer takes the largest micro batch that fits (ours, then 1, with
    the accumulation raised to keep the tokens per step). Our run is repeated at the peer's
    sequence length with our micro batch holding the same tokens as the main run's."""
    import transformers

    out: dict = {"transformers": transformers.__version__, "attempts": []}
    tokens_per_step = args.seq * args.micro_batch * args.grad_accum
    for seq in dict.fromkeys([args.seq, 4096]):
        ours_mb = max(1, args.micro_batch * args.seq // seq)
        for peer_mb in dict.fromkeys([ours_mb, 1]):
            peer_accum = max(1, tokens_per_step // (seq * peer_mb))
            cfg = pretrain_config(args, seq, peer_mb, peer_accum)
            try:
                peer = run_training(
                    cfg,
                    device,
                    "fp32",
                    args.peer_steps,
                    1,
                    False,
                    model_and_parallel=build_hf_peer(cfg, device),
                    name="hf",
                )
            except Exception as err:  # OOM is the expected failure; report any other
                _release(device)
                out["attempts"].append(
                    {
                        "seq": seq,
                        "micro_batch": peer_mb,
                        "grad_accum": peer_accum,
                        "error": f"{type(err).__name__}: {str(err)[:200]}",
                    }
                )
                print(
                    f"hf peer at seq {seq} mb {peer_mb} failed: {type(err).__name__}: {str(err)[:200]}",
                    flush=True,
                )
                if is_oom(err):
                    continue
                return out
            _release(device)
            if seq not in ours:
                ours_accum = max(1, tokens_per_step // (seq * ours_mb))
                ours[seq] = run_training(
                    pretrain_config(args, seq, ours_mb, ours_accum),
                    device,
                    args.params,
                    args.steps,
                    args.warmup,
                    False,
                )
                _release(device)
            ratio = ours[seq].tokens_per_s / peer.tokens_per_s
            out["attempts"].append(
                {
                    "seq": seq,
                    "micro_batch": peer_mb,
                    "grad_accum": peer_accum,
                    "peer": dataclasses.asdict(peer),
                }
            )
            out.update(
                seq=seq,
                ratio=ratio,
                peer_tokens_per_s=peer.tokens_per_s,
                peer_micro_batch=peer_mb,
                peer_grad_accum=peer_accum,
                ours_micro_batch=ours[seq].micro_batch,
                ours_grad_accum=ours[seq].grad_accum,
                ours_tokens_per_s=ours[seq].tokens_per_s,
                ours_mfu=ours[seq].mfu,
                peer_mfu=peer.mfu,
            )
            print(
                f"hf peer at seq {seq} mb {peer_mb} x accum {peer_accum}: {peer.tokens_per_s:,.0f} tokens/s "
                f"(MFU {peer.mfu:.3f}, peak {peer.peak_gib or 0:.1f} GiB); nemotron mb "
                f"{ours[seq].micro_batch} x accum {ours[seq].grad_accum}: {ours[seq].tokens_per_s:,.0f} "
                f"tokens/s (MFU {ours[seq].mfu:.3f}); ratio {ratio:.1f}x",
                flush=True,
            )
            return out
    return out


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument(
        "--params",
        choices=("bf16", "fp32"),
        default="fp32",
        help="fp32 weights under bf16 autocast, or bf16 compute weights with fp32 master (FSDP2)",
    )
    ap.add_argument("--recompute", action="store_true", help="per-block activation recomputation")
    ap.add_argument(
        "--experts-float32-grads",
        action="store_true",
        help="train.experts_float32_grads: the routed experts' weight gradients in float32 (BF16 "
        "experts; FP8 ones with --fp8-experts-gather), not rounded to BF16",
    )
    ap.add_argument(
        "--shared-expert-overlap",
        action="store_true",
        help="train.moe_shared_expert_overlap: MoE shared experts on a side CUDA stream",
    )
    ap.add_argument(
        "--fp8",
        choices=("off",) + FP8_RECIPES,
        default="off",
        help="train.fp8: FP8 GEMMs with this recipe for the dense linears (experts: rowwise)",
    )
    ap.add_argument(
        "--fp8-layers",
        default=None,
        help="comma list of train.fp8.layers, from mamba,attention,shared_expert,mlp,experts,lm_head "
        "(default: train.fp8's, the dense linears; checked like the recipe's key)",
    )
    ap.add_argument("--fp8-eager", action="store_true", help="train.fp8.compile=false")
    ap.add_argument(
        "--fp8-autotune-casts", action="store_true", help="train.fp8.autotune_casts=true (tuned cast kernels)"
    )
    ap.add_argument("--fp8-reuse", dest="fp8_reuse", action="store_true", help="train.fp8.reuse_weights=true")
    ap.add_argument(
        "--fp8-no-reuse",
        dest="fp8_reuse",
        action="store_false",
        help="train.fp8.reuse_weights=false (the default; the default was true on 2026-12-03 14:00-14:26)",
    )
    ap.add_argument(
        "--fp8-lm-head-group-rows",
        type=int,
        default=Fp8Config().lm_head_group_rows,
        help="train.fp8.lm_head_group_rows (the FP8 LM head's rows per scale group and weight-gradient product)",
    )
    ap.add_argument(
        "--fp8-exact-accum",
        dest="fp8_fast_accum",
        action="store_false",
        help="train.fp8.fast_accum=false (every FP8 product accumulates with float32 promotion)",
    )
    ap.add_argument(
        "--fp8-all-gather",
        action="store_true",
        help="train.fp8.fsdp_float8_all_gather=true (FSDP2 gathers the dense linears' weights in float8)",
    )
    ap.add_argument(
        "--fp8-experts-gather",
        action="store_true",
        help="train.fp8.experts_fsdp_float8_all_gather=true (FSDP2 gathers the routed experts' FP8 forms)",
    )
    ap.add_argument(
        "--fp8-experts-wgrad",
        action="store_true",
        help="train.fp8.experts_weight_grad=fp8 (the routed experts' weight gradients on FP8 operands)",
    )
    ap.add_argument(
        "--fp8-experts-gemm",
        choices=EXPERT_GROUPED_GEMMS,
        default="cutlass",
        help="train.fp8.experts_grouped_gemm (the routed experts' forward and input-gradient FP8 products)",
    )
    ap.add_argument(
        "--fp8-experts-tiles",
        type=grouped_tiles_arg,
        default=None,
        metavar="M,N,K,STAGES,WARPS,TMA,PERSISTENT",
        help="train.fp8.experts_grouped_tiles (with --fp8-experts-gemm triton; default: the kernel's)",
    )
    ap.add_argument("--blend", default=None, help="a blend.json to read tokens from (default: synthetic)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument(
        "--check-numerics",
        type=int,
        default=0,
        metavar="N",
        help="also compare the first N steps' losses with the reference path",
    )
    ap.add_argument("--numerics-tol", type=float, default=0.05)
    ap.add_argument("--peer", choices=("hf",), default=None)
    ap.add_argument("--peer-steps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="small widths (CPU smoke test)")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--append-row", default=None, help="append a result row to this Markdown file")
    args = ap.parse_args(argv)
    problem = experts_float32_grads_problem(args.experts_float32_grads, fp8_config(args))
    if problem:
        ap.error(f"--experts-float32-grads (train.experts_float32_grads) {problem}")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env = environment(device)
    command = "python3 benchmarks/train_throughput.py " + " ".join(argv)
    print(f"{env['device']}; torch {env['torch']}, triton {env['triton']}", flush=True)
    result: dict = {"env": env, "command": command, "args": vars(args)}
    with one_rank_group(device, args.params):
        cfg = pretrain_config(args, args.seq, args.micro_batch)
        result["model"] = {
            "hybrid_pattern": cfg.model.hybrid_pattern,
            "num_experts": cfg.model.num_experts,
            "flops_per_token": flops.training_flops_per_token(cfg.model.arch(), args.seq),
        }
        main_run = run_training(cfg, device, args.params, args.steps, args.warmup, not args.no_profile)
        if args.fp8 != "off":
            main_run.name = (
                f"fp8-{args.fp8}"
                + (f"[{args.fp8_layers}]" if args.fp8_layers else "")
                + (" reuse_weights" if args.fp8_reuse else "")
                + (" fsdp_float8_all_gather" if args.fp8_all_gather else "")
                + (" experts_fsdp_float8_all_gather" if args.fp8_experts_gather else "")
                + (" experts_weight_grad=fp8" if args.fp8_experts_wgrad else "")
                + ("" if args.fp8_fast_accum else " fast_accum=false")
                + (
                    f" experts_grouped_gemm={args.fp8_experts_gemm}"
                    if args.fp8_experts_gemm != "cutlass"
                    else ""
                )
                + (
                    f" experts_grouped_tiles={','.join(map(str, args.fp8_experts_tiles))}"
                    if args.fp8_experts_tiles is not None
                    else ""
                )
                + (" autotune_casts" if args.fp8_autotune_casts else "")
                + (
                    f" lm_head_group_rows={args.fp8_lm_head_group_rows}"
                    if args.fp8_lm_head_group_rows != Fp8Config().lm_head_group_rows
                    else ""
                )
            )
        _release(device)
        result["run"] = dataclasses.asdict(main_run)
        print(
            f"proxy {args.params}{' experts-f32-grads' if args.experts_float32_grads else ''}"
            f"{'' if args.fp8 == 'off' else ' ' + main_run.name} seq {args.seq} mb {args.micro_batch} accum {args.grad_accum}: "
            f"{main_run.tokens_per_s:,.0f} tokens/s, step {main_run.step_ms:.1f} ms, "
            f"{main_run.tflops:.0f} TFLOP/s, MFU {main_run.mfu:.3f}, peak "
            f"{main_run.peak_gib or 0:.1f} GiB"
            + (
                f" (reserved {main_run.allocator['peak_reserved_gib']:.1f} GiB, "
                f"{main_run.allocator['alloc_retries']} allocator retries)"
                if main_run.allocator
                else ""
            ),
            flush=True,
        )
        if main_run.split_ms:
            print(
                "split (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in main_run.split_ms.items()), flush=True
            )
        if main_run.peak_gib_by_phase:
            print(
                "peak GiB by phase: "
                + ", ".join(f"{k} {v:.1f}" for k, v in main_run.peak_gib_by_phase.items()),
                flush=True,
            )
        if main_run.device_busy:
            b = main_run.device_busy
            print(
                f"profiled step on the GPU: busy {b['busy_ms']:.1f} of {b['span_ms']:.1f} ms "
                f"(idle {b['idle_ms']:.1f} ms)",
                flush=True,
            )
            print(
                f"profiled step on the host: {b.get('cpu_total_ms', 0):.1f} ms of operators' own time",
                flush=True,
            )
            for op in b.get("cpu_ops", [])[:12]:
                print(f"    cpu {op['self_cpu_ms']:7.2f} ms {op['calls']:6d}x {op['name'][:90]}", flush=True)
            if b.get("idle_by_phase"):
                print(
                    "    idle by the step's phase: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in list(b["idle_by_phase"].items())[:10]),
                    flush=True,
                )
            for gap in b.get("gaps", [])[:8]:
                print(
                    f"    idle {gap['idle_ms']:7.2f} ms in {gap['gaps']:4d} gaps before {gap['before']}",
                    flush=True,
                )
        for k in (main_run.kernels or [])[:15]:
            print(f"  {k['ms']:8.2f} ms {k['calls']:5d}x  {k['name']}", flush=True)
        if args.check_numerics:
            result["numerics"] = check_numerics(args, device, args.check_numerics)
            n = result["numerics"]
            print(
                f"numerics: max |loss fast - loss reference| over {n['steps']} steps = "
                f"{n['max_abs_diff']:.4f} (tol {n['tolerance']}) {'OK' if n['ok'] else 'FAILED'}",
                flush=True,
            )
        if args.peer:
            result["peer"] = run_peer(args, device, {args.seq: main_run})
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    if args.append_row:
        record_row(args.append_row, result)
    return result


def record_row(path: str, result: dict) -> None:
    run, env = result["run"], result["env"]
    split = run.get("split_ms") or {}

    def part(prefix):
        return sum(v for k, v in split.items() if k.startswith(prefix))

    split_text = (
        "-"
        if not split
        else (
            f"mamba {part('mamba'):.0f} / moe {part('moe'):.0f} / attn {part('attention'):.0f} / "
            f"opt {part('optimizer'):.0f} / other {part('other'):.0f}"
        )
    )
    peer = result.get("peer") or {}
    ratio = (
        "-"
        if "ratio" not in peer
        else (
            f"{peer['ratio']:.1f}x (seq {peer['seq']}; ours {peer['ours_tokens_per_s']:,.0f} at mb "
            f"{peer['ours_micro_batch']} x {peer['ours_grad_accum']}, HF {peer['peer_tokens_per_s']:,.0f} at mb "
            f"{peer['peer_micro_batch']} x {peer['peer_grad_accum']})"
        )
    )
    numerics = result.get("numerics")
    num_text = "-" if not numerics else f"{numerics['max_abs_diff']:.3f} over {numerics['steps']} steps"
    append_table_row(
        path,
        "Training throughput: Nano3 proxy, one GPU",
        [
            "date",
            "GPU",
            "weights",
            "seq x mb x accum",
            "tokens/s",
            "step ms",
            "TFLOP/s",
            "MFU",
            "peak GiB",
            "step split ms",
            "vs HF",
            "loss vs ref",
            "software",
            "command",
        ],
        [
            env["date"],
            env["device"],
            run["params"] + ("" if run["name"] == "nemotron" else f" {run['name']}"),
            f"{run['seq']} x {run['micro_batch']} x {run['grad_accum']}",
            f"{run['tokens_per_s']:,.0f}",
            f"{run['step_ms']:.1f}",
            f"{run['tflops']:.0f}",
            f"{run['mfu']:.3f}",
            "-" if run["peak_gib"] is None else f"{run['peak_gib']:.1f}",
            split_text,
            ratio,
            num_text,
            f"torch {env['torch']}, triton {env['triton']}",
            f"`{result['command']}`",
        ],
        intro="`benchmarks/train_throughput.py`: the proxy (first 14 Nano3 blocks `MEMEM*EMEMEM*E`, "
        "Nano3 widths, 64 experts top-6 + shared, vocab 131072) trained through "
        "`Trainer.step()` (`train_step` + the expert-bias update); median step; MFU by `train/flops.py` "
        "against 989 TFLOP/s.",
    )


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
