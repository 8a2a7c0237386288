"""Performance and memory model of a training layout: memory per GPU and step time, before
anything runs.

For a Nano3-shaped model, a layout (TP, EP, CP, PP, DP derived from the GPU count, micro batch,
activation recomputation) and a GPU type, `estimate()` returns the memory per GPU (fp32 master
weights, fp32 gradients, AdamW state, FSDP2's unsharded buffers, activations, loss buffers) and
the step time split into compute and the communication that is not hidden.

Where the numbers come from (docs/parallelism.md "Performance model" has the calibration table):
- Compute: the measured forward+backward time of one full-width block of each kind at 1 x 8192
  tokens on one H200 (`benchmarks/blocks.py`, docs/benchmarks.md), scaled to another config,
  sequence length and split by the one FLOP formula (`nemotron.train.flops`), times a compute
  factor and a per-micro-batch overhead fitted to the one-GPU training runs.
- Communication: bytes per collective from the layout (FSDP2 all-gathers and reduce-scatters per
  unit, EP all-to-alls per MoE layer, SP gathers per block, CP gathers per layer) over a bus
  bandwidth per collective and link kind. No NCCL bandwidth has been measured in this repository:
  the `Hardware` bandwidths are documented assumptions (their `sources` say so). What the
  measurements pin down is the *effective* cost: the exposed fractions and fixed per-call costs
  of `Calibration` are fitted to every multi-GPU row of docs/benchmarks.md by
  `benchmarks/calibrate_plan.py`, which prints the prediction error of each row.
- Memory: exact parameter counts per FSDP unit for the layout (tested against the real
  `parallelize` on a fake process group), bytes per parameter from the training mode (FSDP2
  mixed precision, unsharded gradient accumulation), and activation bytes per token per block
  kind (a count of the tensors each block saves, scaled by one factor fitted to the measured
  peaks).

Library only: returns values; `nemotron nano3 plan` and `pretrain --dry-run` print them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

from nemotron.distributed.config import ParallelismConfig
from nemotron.distributed.parallel_dims import ParallelDims, ParallelLayoutError, sample_lengths
from nemotron.distributed.pipeline_schedules import peak_in_flight, rank_orders, schedule_runs, simulate
from nemotron.distributed.pipeline_split import (
    PipelineSplitError,
    length_shares,
    split_stages,
    stages_per_rank,
)
from nemotron.models.nano3.config import Nano3Config
from nemotron.train import flops as flops_mod
from nemotron.train.fp8_config import Fp8Config, check_fp8_config

GIB = 1024**3
# tokens per piece of the vocab-parallel LM-head loss (distributed/tensor_parallel.py, which
# imports torch; tests/train/test_perf_model.py checks the two agree)
LOSS_CHUNK_TOKENS = 8192


class PlanError(ValueError):
    """A layout that cannot be built for this GPU count, model or batch."""


# -- inputs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How `world` GPUs split the work. DP is derived: world / (TP * CP * PP)."""

    world: int
    tp: int = 1
    ep: int = 1
    cp: int = 1
    pp: int = 1
    micro_batch: int = 1
    recompute: bool = False
    # train.fsdp_accumulate_unsharded: with several micro-batches per step, gather the weights
    # once and accumulate unsharded gradients (fast, memory for the unsharded copies) or
    # gather / reduce-scatter every micro-batch (slow, sharded memory)
    accumulate_unsharded: bool = True
    # the recipe's pipeline split (model.pipeline_schedule, model.virtual_pipeline_model_parallel_size,
    # model.pipeline_blocks_per_stage): the stages are training's own (`_rank_blocks`); a
    # candidate layout of `recommend` has the defaults (1F1B, the split balanced by cost)
    pipeline_schedule: str = "1F1B"
    virtual_stages: int | None = None
    blocks_per_stage: tuple[int, ...] | None = None

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.cp * self.pp)

    @property
    def edp(self) -> int:
        """Expert data parallel: ranks of a stage holding the same experts."""
        return self.dp * self.cp * self.tp // self.ep

    def describe(self) -> str:
        parts = [f"DP{self.dp}"] if self.world % (self.tp * self.cp * self.pp) == 0 else []
        for name, value in (("TP", self.tp), ("EP", self.ep), ("CP", self.cp), ("PP", self.pp)):
            if value > 1:
                parts.append(f"{name}{value}")
        if self.pp > 1 and (self.pipeline_schedule != "1F1B" or self.blocks_per_stage is not None):
            split = "" if self.blocks_per_stage is None else " " + "/".join(map(str, self.blocks_per_stage))
            parts.append(f"({self.pipeline_schedule}{split})")
        text = " ".join(parts) + f" mb{self.micro_batch}"
        text += " +recompute" if self.recompute else ""
        return text + ("" if self.keeps_weights_gathered(2) else " +reshard")

    def keeps_weights_gathered(self, accum: int) -> bool:
        """Whether FSDP2 keeps every unit's weights gathered and accumulates unsharded gradients
        for the whole step: with several micro-batches and `accumulate_unsharded`, and always
        under PP (torch.distributed.pipelining's stages run every backward without gradient
        sync or resharding and reduce once at the end; training builds the stages with
        reshard_after_forward=False), whatever train.fsdp_accumulate_unsharded says."""
        return self.pp > 1 or (accum > 1 and self.accumulate_unsharded)


@dataclass(frozen=True)
class RunShape:
    """The training settings the model depends on (a recipe's `train` section)."""

    seq_length: int = 8192
    global_batch_size: int = 3072
    # MoE shared expert on a side CUDA stream (train.moe_shared_expert_overlap)
    shared_expert_overlap: bool = True
    # train.compute_weights resolved: "bf16" (FSDP2 mixed precision) or "fp32" (one process,
    # fp32 weights cast by autocast, no FSDP)
    compute_weights: str = "bf16"
    # The expert-parallel dispatcher: "overlap" (since issue 21: shared expert on the side
    # stream beside the all-to-all, async token exchange), "sync" (2d78842: one host sync,
    # nothing overlapped), "legacy" (before 2d78842: two host syncs, unfused permutations)
    ep_dispatcher: str = "overlap"
    # data.mixed_length_blends as (seq_length, weight) pairs, with data.blend_weight the weight of
    # the seq_length samples: training validates every length and splits pipeline stages by them
    mixed_lengths: tuple[tuple[int, float], ...] = ()
    blend_weight: float = 1.0
    # train.precision and train.fp8: the model is calibrated on bf16 runs only, and says so
    # (layout_warnings) for anything else; training refuses some FP8 settings under TP (refusal)
    precision: str = "bf16"
    fp8: Fp8Config | None = None

    def __post_init__(self) -> None:
        # what the config schema rejects in a recipe, for callers building a RunShape directly:
        # a share of samples is a weight over their sum
        weights = {"data.blend_weight": self.blend_weight} | {
            f"data.mixed_length_blends[{i}].weight": w for i, (_, w) in enumerate(self.mixed_lengths)
        }
        for key, w in weights.items():
            if not (math.isfinite(w) and w >= 0):
                raise PlanError(f"{key} must be a finite number >= 0, got {w!r}")
        if self.mixed_lengths and sum(weights.values()) <= 0:
            raise PlanError("data.blend_weight and the data.mixed_length_blends weights sum to 0")

    def sample_lengths(self) -> dict[str, int]:
        """Every sample length by the key that sets it (what training checks against 2*CP*TP)."""
        return sample_lengths(self.seq_length, [n for n, _ in self.mixed_lengths])

    def length_shares(self) -> list[tuple[int, float]]:
        """(length, share of samples) of the run's samples (training's `run_lengths`)."""
        return length_shares(self.seq_length, self.blend_weight, list(self.mixed_lengths))

    @property
    def longest(self) -> int:
        """The longest sample: a micro-batch is padded to its longest sample, so this sets the
        activations at the memory peak."""
        return max(self.sample_lengths().values())


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gib: float  # what the device reports
    usable_fraction: float  # of memory_gib the allocator can hand out (fragmentation margin)
    pressure_fraction: float  # above this share of memory_gib, expect allocator retries
    peak_flops: float  # dense bf16
    gpus_per_node: int
    nvlink_busbw: float  # bytes/s, all-gather / reduce-scatter inside a node
    nvlink_a2a_busbw: float  # bytes/s, all-to-all inside a node
    network_busbw: float  # bytes/s per GPU, any collective crossing nodes
    latency_s: float  # per collective call
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def usable_gib(self) -> float:
        return self.memory_gib * self.usable_fraction


H200 = Hardware(
    name="H200 SXM (8 per node, NVLink 4 + NVSwitch, 8x 400 Gb/s InfiniBand NDR per node)",
    memory_gib=139.8,
    usable_fraction=0.90,
    pressure_fraction=0.85,
    peak_flops=flops_mod.H200_BF16_PEAK_FLOPS,
    gpus_per_node=8,
    nvlink_busbw=360e9,
    nvlink_a2a_busbw=300e9,
    network_busbw=45e9,
    latency_s=20e-6,
    sources={
        "memory_gib": "measured: torch.cuda.get_device_properties on the H200s of docs/benchmarks.md",
        "usable_fraction": "assumption: the largest measured peak allocation is 127.3 GiB "
        "(reserved 138.0 GiB of 139.8) on one H200; 90% leaves that margin",
        "peak_flops": "datasheet dense BF16 (the MFU denominator of nemotron.train.flops)",
        "nvlink_busbw": "ASSUMPTION, not measured here: NCCL all-gather/reduce-scatter bus "
        "bandwidth of H100/H200 HGX boards (450 GB/s per direction; nccl-tests "
        "report ~360 GB/s for large messages)",
        "nvlink_a2a_busbw": "ASSUMPTION, not measured here: NCCL all-to-all inside an NVSwitch node",
        "network_busbw": "ASSUMPTION, not measured here: one 400 Gb/s NDR NIC per GPU, ~90% of 50 GB/s",
        "pressure_fraction": "measured: the two runs at 121.7-122.1 GiB allocated (137.7-138.0 "
        "reserved) are the ones slower than the model without it",
        "latency_s": "ASSUMPTION: NCCL launch + small-message latency per collective",
    },
)


# Forward+backward of one full-width Nano3 block at 1 x 8192 tokens on one H200, bf16 compute
# weights, ms (docs/benchmarks.md "Per-block forward+backward"; benchmarks/results/2026-11-29-h200
# blocks_all_1207.json: mamba "fast", attention "fast"; blocks_moe_1322.json: moe "fast-overlap"
# and "fast"); LM-head loss: docs/benchmarks.md "Kernels", chunked + Triton rows.
MEASURED_BLOCK_MS = {
    "mamba": 5.233,
    "attention": 5.592,
    "moe": 8.428,  # shared expert on a side stream (the training default)
    "moe_no_overlap": 8.621,
    "lm_head_loss": 29.38,
}
BLOCK_MS_SOURCES = {
    "mamba": ("blocks_all_1207.json", "mamba", "fast"),
    "attention": ("blocks_all_1207.json", "attention", "fast"),
    "moe": ("blocks_moe_1322.json", "moe", "fast-overlap"),
    "moe_no_overlap": ("blocks_moe_1322.json", "moe", "fast"),
}

# Bytes of activations saved for backward per token by one block at tensor parallel 1 (the
# tensors each block's autograd graph keeps with the fast kernels: block input and normed input,
# projections' inputs and outputs, the MoE's dispatched rows, expert hidden states and outputs);
# scaled by Calibration.activation_scale, fitted to the measured peaks.
ACTIVATION_BYTES_PER_TOKEN = {"mamba": 48_000, "attention": 28_000, "moe": 136_000, "mlp": 40_000}


@dataclass(frozen=True)
class Calibration:
    """The model's fitted constants (`benchmarks/calibrate_plan.py` fits and prints them;
    `tests/train/test_perf_model.py` checks these are the fit of the results in the repo)."""

    block_ms: dict[str, float] = field(default_factory=lambda: dict(MEASURED_BLOCK_MS))
    compute_scale: float = 0.955  # step compute / sum of the isolated block benchmarks
    micro_batch_overhead_s: float = 0.0  # per micro-batch beyond the blocks and the LM head
    step_overhead_s: float = 0.002  # per step: logging, balancing update, host syncs
    optimizer_s_per_param: float = 29.25e-12  # per local param: AdamW, clip, zeroing, casts
    # exposed collective time / its time at the assumed bus bandwidth (1: serial at the assumed
    # bandwidth; < 1: partly hidden; > 1: slower than assumed)
    fsdp_exposed: float = 1.0
    a2a_exposed: float = 3.375  # the EP all-to-all runs at ~89 GB/s effective on 2-4 H200s
    # per dispatch (one MoE layer, one micro-batch): the host sync for the split sizes and the
    # launch queue refilling after it; "legacy" made two syncs and unfused permutations
    ep_dispatch_s: dict[str, float] = field(
        default_factory=lambda: {"overlap": 0.003375, "sync": 0.003375, "legacy": 0.00675}
    )
    tp_block_s: float = 0.012  # per block per micro-batch under TP + SP, beyond bandwidth
    cp_layer_s: float = 0.0135  # per Mamba/attention layer per micro-batch under CP
    # Step time x (1 + this) when the predicted peak exceeds Hardware.pressure_fraction of the
    # GPU's memory: the caching allocator, out of free blocks, frees and retries (device syncs)
    allocator_pressure_slowdown: float = 0.15
    activation_scale: float = 1.164
    loss_buffer_factor: float = 0.122  # fp32 [chunk tokens, vocab/TP] tensors alive at the peak
    memory_overhead_gib: float = 2.0


CALIBRATION = Calibration()


# -- parameter counts per FSDP unit ---------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One FSDP2 unit on one rank: its parameters' shapes after TP/EP splitting (what an
    all-gather materialises), sharded over `group` ranks (`stride` apart in rank order)."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    group: int
    stride: int
    kind: str  # "dense", "experts", "local" (rank-local parameters under TP), "root", "embed"
    block: int | None = None

    @property
    def unsharded(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def sharded(self) -> int:
        """Elements rank 0 keeps: FSDP2 shards dim 0 (experts: the first dim that splits
        evenly, `parallelize._expert_shard_placement`), padding an uneven dim 0."""
        g, total = self.group, 0
        for shape in self.shapes:
            dim = 0
            if self.kind == "experts":
                dim = next((d for d, n in enumerate(shape) if n % g == 0), 0)
            rest = math.prod(shape) // shape[dim]
            total += -(-shape[dim] // g) * rest
        return total


Shapes = list[tuple[int, ...]]


def _block_params(cfg: Nano3Config, kind: str, tp: int) -> tuple[Shapes, Shapes, Shapes]:
    """Parameter shapes on one TP rank, before FSDP: (the block's unit: with TP its
    DTensor-parallel parameters, split over TP; its rank-local unit: with TP the parameters every
    TP rank holds whole and computes with in part, gathered whole over DP x TP; its routed
    experts before EP). Without TP everything but the experts is the block's unit."""
    h = cfg.hidden_size
    norm: Shapes = [(h,)]
    split: Shapes
    local: Shapes
    experts: Shapes = []
    if kind == "attention":
        q = cfg.num_attention_heads * cfg.head_dim // tp
        # fewer KV heads than TP ranks: k/v stay whole on every rank (each uses its head)
        kv = cfg.num_key_value_heads
        kv_dim = (kv // tp if kv >= tp else kv) * cfg.head_dim
        split, local = [(q, h), (kv_dim, h), (kv_dim, h), (h, q)], norm
    elif kind == "mamba":
        d_inner, heads = cfg.mamba_d_inner, cfg.mamba_num_heads
        gn = cfg.mamba_num_groups * cfg.mamba_state_size
        split = [(h, d_inner // tp)]  # out_proj
        local = norm + [
            (2 * d_inner + 2 * gn + heads, h),
            (d_inner + 2 * gn, 1, cfg.mamba_conv_kernel),
            (d_inner + 2 * gn,),
            (heads,),
            (heads,),
            (heads,),
            (d_inner,),
        ]
    elif kind == "moe":
        shared = cfg.moe_shared_expert_hidden_size // tp
        split, local = [(shared, h), (h, shared)], norm + [(cfg.num_experts, h)]
        experts = [
            (cfg.num_experts, cfg.moe_ffn_hidden_size, h),
            (cfg.num_experts, h, cfg.moe_ffn_hidden_size),
        ]
    elif kind == "mlp":
        f = cfg.ffn_hidden_size // tp
        split, local = [(f, h), (h, f)], norm
    else:
        raise PlanError(f"unknown block kind {kind!r}")
    if tp == 1:
        return local + split, [], experts
    return split, local, experts


def fsdp_units(cfg: Nano3Config, layout: Layout) -> list[Unit]:
    """The FSDP2 units of one rank, as `nemotron.distributed.apply.apply_fsdp` builds them
    (every block; `stage_units` keeps a pipeline stage's). Under TP a block's DTensor-parallel
    submodules are several FSDP units over DP; they are counted as one here."""
    key = (dataclasses.astuple(cfg), layout.tp, layout.ep, layout.dp, layout.cp)
    if key not in _UNITS:
        if len(_UNITS) > 4096:
            _UNITS.clear()
        _UNITS[key] = _fsdp_units(cfg, layout)
    return _UNITS[key]


_UNITS: dict[tuple, list[Unit]] = {}


def _fsdp_units(cfg: Nano3Config, layout: Layout) -> list[Unit]:
    tp, ep = layout.tp, layout.ep
    dense_group, dense_stride = layout.dp * layout.cp, tp
    vocab = (cfg.vocab_size // tp, cfg.hidden_size)
    units = [Unit("embeddings", (vocab,), dense_group, dense_stride, "embed")]
    for i, kind in enumerate(cfg.block_kinds):
        own, local, experts = _block_params(cfg, kind, tp)
        units.append(Unit(f"layers.{i}", tuple(own), dense_group, dense_stride, "dense", i))
        if local:
            units.append(Unit(f"layers.{i}.local", tuple(local), dense_group * tp, 1, "local", i))
        if experts:
            on_rank = tuple((e // ep, *rest) for e, *rest in experts)
            units.append(Unit(f"layers.{i}.experts", on_rank, layout.edp, ep, "experts", i))
    norm_f: tuple[tuple[int, ...], ...] = ((cfg.hidden_size,),)
    head: tuple[tuple[int, ...], ...] = () if cfg.tie_word_embeddings else (vocab,)
    if tp == 1:
        units.append(Unit("root", norm_f + head, dense_group, dense_stride, "root"))
    else:  # the final norm is rank-local (on the sequence shard): its own unit over DP x TP
        units.append(Unit("norm_f", norm_f, dense_group * tp, 1, "local"))
        units.append(Unit("root", head, dense_group, dense_stride, "root"))
    return units


def stage_units(cfg: Nano3Config, layout: Layout, stage: int, shape: RunShape | int) -> list[Unit]:
    """Units of pipeline rank `stage` (its stages' blocks in training's split; the embeddings on
    the rank of the first stage, the LM head on the rank of the last). `shape`: the run (its
    sample lengths set the split), or just its sequence length."""
    units = fsdp_units(cfg, layout)
    if layout.pp == 1:
        return units
    rank = rank_blocks(cfg, layout, shape)[stage]
    keep = []
    for u in units:
        if u.block is not None:
            if u.block in rank.blocks:
                keep.append(u)
        elif (u.kind == "embed" and rank.first) or (u.name in ("root", "norm_f") and rank.last):
            keep.append(u)
    return keep


@dataclass(frozen=True)
class RankBlocks:
    """What one pipeline rank holds: the blocks of its stages, and whether it has the first
    stage (the embeddings) and the last (the final norm, the LM head and its loss); `stages`:
    the ids of its stages and the blocks of each (one stage without PP)."""

    blocks: tuple[int, ...]
    first: bool
    last: bool
    stages: tuple[tuple[int, tuple[int, ...]], ...] = ()


def rank_blocks(cfg: Nano3Config, layout: Layout, shape: RunShape | int) -> list[RankBlocks]:
    """The blocks of each of the `layout.pp` pipeline ranks as training splits and places them:
    `distributed.pipeline_split.split_stages` (the one home of that rule) with the layout's
    schedule, stages per rank and manual split, balanced by cost at the run's sample lengths."""
    if isinstance(shape, int):
        shape = RunShape(seq_length=shape)
    key = (
        dataclasses.astuple(cfg),
        layout.pp,
        layout.pipeline_schedule,
        layout.virtual_stages,
        layout.blocks_per_stage,
        tuple(shape.length_shares()),
    )
    if key not in _RANKS:
        if len(_RANKS) > 4096:
            _RANKS.clear()
        _RANKS[key] = _rank_blocks(cfg, layout, shape)
    return _RANKS[key]


_RANKS: dict[tuple, list[RankBlocks]] = {}


def _rank_blocks(cfg: Nano3Config, layout: Layout, shape: RunShape) -> list[RankBlocks]:
    try:
        split = split_stages(cfg, layout_parallelism(layout), shape.length_shares())
    except PipelineSplitError as exc:
        raise PlanError(str(exc)) from None
    last = len(split.blocks) - 1
    out = []
    for rank in range(layout.pp):
        stages = [s for s, r in enumerate(split.ranks) if r == rank]
        blocks = tuple(i for s in stages for i in split.blocks[s])
        held = tuple((s, tuple(split.blocks[s])) for s in stages)
        out.append(RankBlocks(blocks, 0 in stages, last in stages, held))
    return out


# -- outputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak allocated memory per GPU (GiB), by what holds it, at the step's peak."""

    weights: float  # fp32 master weights (FSDP shards)
    gradients: float  # fp32 gradients present at the peak
    optimizer: float  # AdamW exp_avg + exp_avg_sq (fp32)
    fsdp_buffers: float  # unsharded bf16 weights (+ fp32 accumulated grads) held by FSDP2
    activations: float  # saved for backward at the peak (+ MoE/CP transients)
    loss_buffers: float  # fp32 logits/softmax pieces of the LM-head loss
    other: float  # calibrated constant
    usable: float  # what the GPU can hold (Hardware.usable_gib)
    peak_phase: str  # "backward" or "optimizer step"

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.fsdp_buffers
            + self.activations
            + self.loss_buffers
            + self.other
        )

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


@dataclass(frozen=True)
class StepEstimate:
    """Seconds of one optimizer step on one GPU, by what takes them (exposed time only)."""

    compute: float  # blocks + LM head + per-micro-batch overhead (+ recompute)
    optimizer: float  # AdamW and the other per-parameter passes, per-step overhead
    fsdp: float  # exposed FSDP2 all-gathers / reduce-scatters
    expert_parallel: float  # exposed all-to-alls and dispatch syncs
    tensor_parallel: float  # SP gathers / reduce-scatters and per-block TP overhead
    context_parallel: float
    pipeline_bubble: float
    hidden: dict[str, float]  # communication time overlapped with compute (not in the total)
    allocator: float = 0.0  # slowdown near the memory limit (Calibration.allocator_pressure_slowdown)

    @property
    def total(self) -> float:
        return (
            self.compute
            + self.optimizer
            + self.fsdp
            + self.expert_parallel
            + self.tensor_parallel
            + self.context_parallel
            + self.pipeline_bubble
            + self.allocator
        )


@dataclass(frozen=True)
class Plan:
    layout: Layout
    shape: RunShape
    memory: MemoryEstimate
    step: StepEstimate
    grad_accumulation: int
    tokens_per_second_per_gpu: float
    mfu: float
    warnings: tuple[str, ...]
    implemented: bool  # False: a layout training refuses (the warnings say why)


# -- the model -----------------------------------------------------------------------------------


def layout_parallelism(layout: Layout) -> ParallelismConfig:
    """The recipe settings (`model.*`) that select `layout`."""
    return ParallelismConfig(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.tp > 1,
        pipeline_schedule=layout.pipeline_schedule,
        virtual_pipeline_model_parallel_size=layout.virtual_stages,
        pipeline_blocks_per_stage=None if layout.blocks_per_stage is None else list(layout.blocks_per_stage),
    )


def validate_layout(cfg: Nano3Config, layout: Layout, shape: RunShape) -> int:
    """The checks training runs at its start (`ParallelDims`, their one home: sizes against the
    world and the model, the pipeline split, the batch against DP, every sample length against
    2*CP*TP); returns gradient accumulation."""
    try:
        dims = ParallelDims.from_config(layout_parallelism(layout), layout.world, cfg)
        dims.validate_batch(shape.global_batch_size, layout.micro_batch, shape.sample_lengths(), cfg)
        return dims.gradient_accumulation_steps(shape.global_batch_size, layout.micro_batch)
    except ParallelLayoutError as exc:
        raise PlanError(str(exc)) from None


def refusal(cfg: Nano3Config, layout: Layout, shape: RunShape) -> str | None:
    """Why training refuses `layout` although it can be built (a `train.fp8` recipe that does
    not compose with the layout's TP), in the training code's words; None when it runs it. PP
    composes with DP, TP + SP, CP and EP, and `train.compile` with every layout
    (docs/parallelism.md "Pipeline parallel")."""
    if shape.fp8 is not None:
        for key, message in check_fp8_config(shape.fp8, shape.precision, layout.tp):
            return f"{key}: {message}"
    return None


_NANO3 = Nano3Config()


def _kind_seconds(cfg: Nano3Config, kind: str, seq: int, cal: Calibration, overlap: bool) -> float:
    """Forward+backward seconds of one block of `kind` for 8192 tokens of a `seq`-token sequence:
    the measured Nano3 time scaled by the FLOP ratio (one FLOP formula)."""
    ref = _NANO3  # the measured block times are of the full-size model
    per_kind = {
        "attention": (
            flops_mod.attention_forward_flops(cfg, seq),
            flops_mod.attention_forward_flops(ref, 8192),
        ),
        "mamba": (flops_mod.mamba_forward_flops(cfg), flops_mod.mamba_forward_flops(ref)),
        "moe": (flops_mod.moe_forward_flops(cfg), flops_mod.moe_forward_flops(ref)),
        # no dense-MLP block in Nano3 was measured: the MoE block's rate per FLOP stands in
        "mlp": (flops_mod.mlp_forward_flops(cfg), flops_mod.moe_forward_flops(ref)),
    }
    mine, theirs = per_kind[kind]
    key = (
        "moe"
        if kind in ("moe", "mlp") and overlap
        else ("moe_no_overlap" if kind in ("moe", "mlp") else kind)
    )
    return cal.block_ms[key] * 1e-3 * mine / theirs


def _head_seconds(cfg: Nano3Config, cal: Calibration) -> float:
    ref = _NANO3  # the measured block times are of the full-size model
    return (
        cal.block_ms["lm_head_loss"]
        * 1e-3
        * (cfg.hidden_size * cfg.vocab_size)
        / (ref.hidden_size * ref.vocab_size)
    )


def _busbw(hw: Hardware, size: int, stride: int) -> float:
    """All-gather / reduce-scatter bus bandwidth over `size` ranks `stride` apart in rank order
    (TP innermost, then CP, DP; in the expert view EP innermost): NVLink if inside a node."""
    if size * stride <= hw.gpus_per_node:
        return hw.nvlink_busbw
    return hw.network_busbw


def _collective_s(hw: Hardware, full_bytes: float, size: int, stride: int) -> float:
    """All-gather or reduce-scatter of a `full_bytes` tensor over `size` ranks."""
    if size <= 1:
        return 0.0
    return hw.latency_s + full_bytes * (size - 1) / size / _busbw(hw, size, stride)


def _all_to_all_s(hw: Hardware, bytes_per_rank: float, size: int, stride: int) -> float:
    """All-to-all where each rank holds `bytes_per_rank` spread evenly over the group."""
    if size <= 1:
        return 0.0
    remote = bytes_per_rank * (size - 1) / size
    node = max(1, hw.gpus_per_node // stride)
    if size <= node:
        return hw.latency_s + remote / hw.nvlink_a2a_busbw
    inter = bytes_per_rank * (size - node) / size
    intra = remote - inter
    return hw.latency_s + max(inter / hw.network_busbw, intra / hw.nvlink_a2a_busbw)


def estimate(
    cfg: Nano3Config,
    layout: Layout,
    shape: RunShape = RunShape(),
    hw: Hardware = H200,
    cal: Calibration = CALIBRATION,
) -> Plan:
    """Memory per GPU and step time of `layout` (raises PlanError if it cannot be built)."""
    accum = validate_layout(cfg, layout, shape)
    memory = estimate_memory(cfg, layout, shape, hw, cal, accum)
    step = estimate_step(cfg, layout, shape, hw, cal, accum)
    if memory.total > hw.pressure_fraction * hw.memory_gib:
        step = dataclasses.replace(step, allocator=cal.allocator_pressure_slowdown * step.total)
    # tokens and model FLOPs of a step: every sample at its own length (mixed lengths: a
    # 512K-token sample costs more per token than a 4K one), padding not counted
    shares = shape.length_shares()
    tokens = shape.global_batch_size * sum(share * n for n, share in shares)
    tps = tokens / step.total / layout.world
    mfu = flops_mod.mfu(tps, cfg, shape.seq_length, 1, hw.peak_flops, length_shares=shares)
    refused = refusal(cfg, layout, shape)
    return Plan(
        layout=layout,
        shape=shape,
        memory=memory,
        step=step,
        grad_accumulation=accum,
        tokens_per_second_per_gpu=tps,
        mfu=mfu,
        warnings=tuple(layout_warnings(cfg, layout, shape, hw, cal)) + ((refused,) if refused else ()),
        implemented=refused is None,
    )


def micro_batch_lengths(shape: RunShape, micro_batch: int) -> list[tuple[int, float]]:
    """(length a micro-batch is computed at, share of the micro-batches). One sample per
    micro-batch: each at its own length, in the mix's shares. Several: a micro-batch is padded
    to its longest sample, and the blending rule interleaves the lengths sample by sample, so
    (nearly) every micro-batch holds a longest one: all at the longest length."""
    shares = shape.length_shares()
    if micro_batch == 1 or len(shares) == 1:
        return shares
    return [(shape.longest, 1.0)]


def pipeline_length_runs(shape: RunShape, micro_batch: int, n_micro: int) -> list[tuple[int, int, float]]:
    """(length, micro-batches, share of the steps) of each schedule step training runs in an
    optimizer step under PP: one of all `n_micro` micro-batches; with one sample per
    micro-batch of mixed lengths one per length (`Pipeline._groups`), of about n x share
    micro-batches, in n x share of the steps when fewer than one (the further cuts where the
    DP ranks' lengths differ are not modelled)."""
    lengths = micro_batch_lengths(shape, micro_batch)
    if len(lengths) == 1:
        return [(lengths[0][0], n_micro, 1.0)]
    return [(seq, max(1, round(n_micro * share)), min(1.0, n_micro * share)) for seq, share in lengths]


def action_shares(recompute: bool) -> dict[str, float]:
    """A pipeline rank's time of one micro-batch (forward and backward) split over the kinds
    of schedule action (`distributed.pipeline_schedules`): the backward runs two matmuls per
    forward one (input and weight gradients), so B = 2F and, split, I = W = F; with
    recomputation the forward runs again inside the backward (in B, or in I when split):
    F = W = 1/4, I = 1/2. The per-micro-batch costs beside the blocks' (EP exchanges, TP/CP
    collectives, launch overhead) are split in the same shares."""
    forward = 1 / 4 if recompute else 1 / 3
    return {"F": forward, "B": 1 - forward, "I": 1 - 2 * forward, "W": forward}


@functools.lru_cache(maxsize=64)
def _schedule_orders(schedule: str, pp: int, virtual: int, count: int) -> list[list[tuple[int, str, int]]]:
    return rank_orders(schedule, pp, virtual, count)


@functools.lru_cache(maxsize=256)
def _schedule_idle(schedule: str, pp: int, virtual: int, n_micro: int, recompute: bool) -> float:
    shares = action_shares(recompute)
    total = 0.0
    for name, count in schedule_runs(schedule, pp, n_micro):
        timeline = simulate(
            _schedule_orders(name, pp, virtual, count), pp * virtual, lambda a: shares[a[1]] / virtual
        )
        total += timeline.makespan
    return total - n_micro


def pipeline_idle(layout: Layout, n_micro: int) -> float:
    """Idle time per step of a pipeline rank under the layout's schedule, in units of one
    micro-batch's forward and backward on a rank: torch's order of each schedule step that
    training runs for `n_micro` micro-batches (`pipeline_schedules.schedule_runs`), timed with
    `action_shares` and each of a rank's stages taking 1/V of its time (the stages run at the
    pace of the slowest rank, as the model's compute does). 1F1B and GPipe: PP - 1;
    Interleaved1F1B: (PP - 1) / V; the zero-bubble schedules fill most of the rest with
    weight gradients."""
    virtual = stages_per_rank(layout_parallelism(layout))
    return _schedule_idle(layout.pipeline_schedule, layout.pp, virtual, n_micro, layout.recompute)


def pipeline_in_flight(layout: Layout, n_micro: int, rank: int, stage_bytes: dict[int, float]) -> float:
    """The most activation bytes pipeline rank `rank` holds at once over a step of `n_micro`
    micro-batches: its order in each schedule step (`pipeline_schedules.peak_in_flight`: a
    forward stores a micro-batch of that stage, B or, with the backward split, W frees it),
    a micro-batch of stage s weighing `stage_bytes[s]`."""
    virtual = stages_per_rank(layout_parallelism(layout))
    peak = 0.0
    for name, count in schedule_runs(layout.pipeline_schedule, layout.pp, n_micro):
        orders = _schedule_orders(name, layout.pp, virtual, count)
        peak = max(peak, peak_in_flight([orders[rank]], stage_bytes.__getitem__)[0])
    return peak


def estimate_step(
    cfg: Nano3Config, layout: Layout, shape: RunShape, hw: Hardware, cal: Calibration, accum: int
) -> StepEstimate:
    tp, cp, ep, pp = layout.tp, layout.cp, layout.ep, layout.pp
    mb = layout.micro_batch
    kinds = cfg.block_kinds
    h = cfg.hidden_size
    overlap = shape.shared_expert_overlap and (ep == 1 or shape.ep_dispatcher == "overlap")
    ranks = (
        rank_blocks(cfg, layout, shape) if pp > 1 else [RankBlocks(tuple(range(cfg.num_layers)), True, True)]
    )

    def micro(seq: int) -> tuple[float, float, float, float, float, float]:
        """One micro-batch of `seq`-token sequences on the slowest pipeline rank: (compute, exposed
        EP, hidden EP, TP, CP, pipeline send seconds)."""
        tokens_rank = mb * seq / cp  # tokens of this rank's part of the micro-batch's sequences
        scale = tokens_rank / 8192 / tp
        head_s = _head_seconds(cfg, cal) * scale

        def rank_compute(rank: RankBlocks) -> float:
            block_s = sum(_kind_seconds(cfg, kinds[i], seq, cal, overlap) for i in rank.blocks) * scale
            t = cal.compute_scale * (block_s + (head_s if rank.last else 0.0))  # the LM head, its loss
            return t + (cal.compute_scale * block_s / 3 if layout.recompute else 0.0)  # + forward

        # the slowest pipeline rank sets the pace (training's split; the last stage has the head)
        slowest = max(ranks, key=rank_compute)
        stage_kinds = [kinds[i] for i in slowest.blocks]
        compute_mb = cal.micro_batch_overhead_s + rank_compute(slowest)
        n_moe = sum(k == "moe" for k in stage_kinds)
        n_seq_layers = sum(k in ("mamba", "attention") for k in stage_kinds)

        # expert parallel: 4 all-to-alls of the routed rows per MoE layer (dispatch and combine,
        # forward and backward; +2 when the forward is recomputed), one host sync per dispatch
        ep_mb, ep_hidden = 0.0, 0.0
        if ep > 1:
            routed_bytes = tokens_rank / tp * cfg.moe_top_k * h * 2
            passes = 4 + (2 if layout.recompute else 0)
            a2a = passes * _all_to_all_s(hw, routed_bytes, ep, 1)
            syncs = (1 + int(layout.recompute)) * cal.ep_dispatch_s[shape.ep_dispatcher]
            exposed = cal.a2a_exposed * a2a
            if shape.ep_dispatcher == "overlap" and shape.shared_expert_overlap:
                # the shared expert runs on the side stream while the tokens are exchanged
                shared_share = (2 * h * cfg.moe_shared_expert_hidden_size * 2) / flops_mod.moe_forward_flops(
                    cfg
                )
                shared_s = (
                    cal.compute_scale * _kind_seconds(cfg, "moe", seq, cal, True) * scale * shared_share
                )
                ep_hidden = min(exposed, shared_s)
                exposed -= ep_hidden
            ep_mb = n_moe * (exposed + syncs)
            ep_hidden *= n_moe

        # tensor + sequence parallel: per block, gather the input and reduce-scatter the output,
        # forward and backward (MoE: the shared expert's pair as well); the loss's gathers
        tp_mb = 0.0
        if tp > 1:
            act_bytes = tokens_rank * h * 2  # the gathered [tokens, hidden] bf16 activations
            per_block = 4 * _collective_s(hw, act_bytes, tp, 1)
            collectives = len(stage_kinds) * per_block + n_moe * per_block
            tp_mb = collectives + len(stage_kinds) * cal.tp_block_s

        # context parallel: K/V gather per attention layer, halos and states per Mamba layer
        cp_mb = 0.0
        if cp > 1:
            kv = max(1, cfg.num_key_value_heads // tp) * cfg.head_dim * 2 * 2  # k and v, bf16
            n_attn = sum(k == "attention" for k in stage_kinds)
            cp_mb = n_attn * 2 * _collective_s(hw, mb * seq * kv, cp, tp)
            cp_mb += n_seq_layers * cal.cp_layer_s
        # a rank sends each TP rank's activations to the next stage and the gradients back
        send = 2 * _collective_s(hw, tokens_rank / tp * h * 2 * 2, 2, hw.gpus_per_node) if pp > 1 else 0.0
        return compute_mb, ep_mb, ep_hidden, tp_mb, cp_mb, send

    n_micro = accum
    compute_mb = ep_mb = ep_hidden = tp_mb = cp_mb = send = 0.0
    by_length = {}
    for seq, share in micro_batch_lengths(shape, mb):  # the mean micro-batch of the step
        parts = by_length[seq] = micro(seq)
        compute_mb += share * parts[0]
        ep_mb += share * parts[1]
        ep_hidden += share * parts[2]
        tp_mb += share * parts[3]
        cp_mb += share * parts[4]
        send += share * parts[5]
    bubble = 0.0
    if pp > 1:
        # each schedule step's own idle time (`pipeline_idle`, in units of a rank's
        # micro-batch at the step's length) and one send each way per micro-batch on the
        # critical path. The interleaved and V schedules cross ranks V times per micro-batch;
        # torch's multi-stage runtime posts their receives ahead of the compute that needs
        # them, so the extra crossings are taken as hidden behind the other stages' compute
        # (an assumption: nothing measured)
        for seq, count, steps in pipeline_length_runs(shape, mb, n_micro):
            parts = by_length[seq]
            bubble += steps * pipeline_idle(layout, count) * (parts[0] + parts[1] + parts[3] + parts[4])
        bubble += n_micro * send

    # FSDP2: per step one all-gather (bf16) and one reduce-scatter (fp32) of every unit when
    # accumulating unsharded over several micro-batches; otherwise every micro-batch gathers in
    # forward, again in backward (not the root unit) and reduce-scatters
    last = next(i for i, r in enumerate(ranks) if r.last)
    units = stage_units(cfg, layout, last, shape)
    fsdp = 0.0
    once = layout.keeps_weights_gathered(n_micro)
    for u in units:
        gathers = 1 if (once or u.kind == "root") else 2
        rounds = 1 if once else n_micro
        ag = _collective_s(hw, 2 * u.unsharded, u.group, u.stride)
        rs = _collective_s(hw, 4 * u.unsharded, u.group, u.stride)
        fsdp += rounds * (gathers * ag + rs)
    local_params = sum(u.sharded for u in units)
    optimizer = cal.step_overhead_s + cal.optimizer_s_per_param * local_params
    return StepEstimate(
        compute=n_micro * compute_mb,
        optimizer=optimizer,
        fsdp=cal.fsdp_exposed * fsdp,
        expert_parallel=n_micro * ep_mb,
        tensor_parallel=n_micro * tp_mb,
        context_parallel=n_micro * cp_mb,
        pipeline_bubble=bubble,
        hidden={"fsdp": (1 - cal.fsdp_exposed) * fsdp, "expert_parallel": n_micro * ep_hidden},
    )


def activation_bytes(
    cfg: Nano3Config, kinds: list[str], tokens: float, tp: int, recompute: bool, cal: Calibration
) -> float:
    """Activations saved for backward by these blocks for `tokens` tokens of one rank. Under TP
    + SP a block keeps 1/TP of its activations plus the gathered [tokens, hidden] input of its
    column-parallel projections (MoE: the shared expert's too)."""
    gathered = 0.0 if tp == 1 else tokens * cfg.hidden_size * 2
    per_block = [
        ACTIVATION_BYTES_PER_TOKEN[k] * cal.activation_scale * tokens / tp
        + gathered * (2 if k == "moe" else 1)
        for k in kinds
    ]
    if not recompute:
        return float(sum(per_block))
    inputs = len(kinds) * tokens / tp * cfg.hidden_size * 2
    return inputs + max(per_block, default=0.0)  # one block recomputed at a time


def estimate_memory(
    cfg: Nano3Config, layout: Layout, shape: RunShape, hw: Hardware, cal: Calibration, accum: int
) -> MemoryEstimate:
    """The peak of the fullest GPU: under PP every pipeline rank is estimated with its own
    blocks, parameters, micro-batches in flight and (the last stage's) loss buffers, and the
    largest is returned (a middle stage of many MoE blocks can hold more than the first or last)."""
    if layout.pp == 1:
        return _rank_memory(cfg, layout, shape, hw, cal, accum, None, 0)
    ranks = rank_blocks(cfg, layout, shape)
    return max(
        (_rank_memory(cfg, layout, shape, hw, cal, accum, rank, r) for r, rank in enumerate(ranks)),
        key=lambda m: m.total,
    )


def _rank_memory(
    cfg: Nano3Config,
    layout: Layout,
    shape: RunShape,
    hw: Hardware,
    cal: Calibration,
    accum: int,
    rank: RankBlocks | None,
    index: int,
) -> MemoryEstimate:
    tp, cp = layout.tp, layout.cp
    units = stage_units(cfg, layout, index, shape)
    kinds = [cfg.block_kinds[i] for i in (rank.blocks if rank is not None else range(cfg.num_layers))]
    sharded = sum(u.sharded for u in units)
    unsharded = sum(u.unsharded for u in units)
    # a micro-batch is as long as its longest sample (padded; one sample: the longest one)
    seq = shape.longest
    tokens = layout.micro_batch * seq / cp
    # the activations of the micro-batches a rank holds at once, as its schedule runs them
    # (`pipeline_in_flight`: 1F1B PP - r on rank r, GPipe all of the step's, ...), each of its
    # stages' micro-batches counted with that stage's blocks; the most of any schedule step
    # (with mixed lengths one per length: fewer micro-batches, each shorter than the longest)
    acts: float = activation_bytes(cfg, kinds, tokens, tp, layout.recompute, cal)
    if rank is not None:
        acts = 0.0
        for length, count, _ in pipeline_length_runs(shape, layout.micro_batch, accum):
            length_tokens = layout.micro_batch * length / cp
            stage_bytes = {
                s: activation_bytes(
                    cfg, [cfg.block_kinds[i] for i in blocks], length_tokens, tp, layout.recompute, cal
                )
                for s, blocks in rank.stages
            }
            acts = max(acts, pipeline_in_flight(layout, count, index, stage_bytes))
    chunk = min(tokens, LOSS_CHUNK_TOKENS)
    on_last = rank is None or rank.last  # the LM head's loss buffers live on the last stage
    loss: float = cal.loss_buffer_factor * 4 * chunk * cfg.vocab_size / tp if on_last else 0.0
    if cp > 1:
        acts += 2 * 2 * layout.micro_batch * seq * max(1, cfg.num_key_value_heads // tp) * cfg.head_dim
    fp32_single = shape.compute_weights == "fp32" and layout.world == 1
    accumulate = layout.keeps_weights_gathered(accum) and not fp32_single
    weights, adam = 4.0 * sharded, 8.0 * sharded
    largest = max(u.unsharded for u in units)
    if accumulate:
        # every unit's bf16 weights stay gathered and its fp32 gradients accumulate unsharded
        # for the whole step; the sharded gradients exist only after the last reduce-scatter
        buffers: float = (2 + 4) * unsharded
        grads = 0.0
        backward = weights + adam + buffers + acts + loss
    else:
        # gradients appear unit by unit during backward while activations are freed; FSDP2
        # holds the gathered bf16 weights and bf16 gradients of about two units at a time
        transient = 0.0 if fp32_single else 2 * (2 + 2) * largest
        if accum > 1:
            # sharded fp32 gradients (or plain .grad in one fp32 process) accumulate in place
            grads = 4.0 * sharded
            backward = weights + adam + grads + acts + loss
        else:
            grads, acts, loss = _backward_sweep(units, acts, loss)
            backward = weights + adam + grads + acts + loss
        buffers = transient
        backward += transient
    optimizer_phase = 16 * sharded
    peak_phase = "backward" if backward >= optimizer_phase else "optimizer step"
    if peak_phase == "optimizer step":
        grads, buffers, acts, loss = 4.0 * sharded, 0.0, 0.0, 0.0
    return MemoryEstimate(
        weights=weights / GIB,
        gradients=grads / GIB,
        optimizer=adam / GIB,
        fsdp_buffers=buffers / GIB,
        activations=acts / GIB,
        loss_buffers=loss / GIB,
        other=cal.memory_overhead_gib,
        usable=hw.usable_gib,
        peak_phase=peak_phase,
    )


def _backward_sweep(units: list[Unit], acts: float, loss: float) -> tuple[float, float, float]:
    """The point of backward (which runs the blocks in reverse, freeing each block's
    activations and producing its gradients) where activations + gradients peak: returns
    (gradient bytes, activation bytes, loss-buffer bytes) there."""
    by_block: dict[int | None, int] = {}
    for u in units:
        by_block[u.block] = by_block.get(u.block, 0) + u.sharded
    blocks = sorted(b for b in by_block if b is not None)
    n = max(len(blocks), 1)
    grads = 4 * by_block.get(None, 0)  # LM head (root) first; embeddings counted early too
    best = (-1.0, 0.0, 0.0, 0.0)
    for done in range(len(blocks) + 1):
        remaining = acts * (n - done) / n
        at_loss = loss if done == 0 else 0.0  # the loss pieces are recomputed first
        total = remaining + grads + at_loss
        if total > best[0]:
            best = (total, grads, remaining, at_loss)
        if done < len(blocks):
            grads += 4 * by_block[blocks[len(blocks) - 1 - done]]
    return best[1], best[2], best[3]


# -- advice --------------------------------------------------------------------------------------


def layout_warnings(
    cfg: Nano3Config, layout: Layout, shape: RunShape, hw: Hardware = H200, cal: Calibration = CALIBRATION
) -> list[str]:
    """Known-slow choices in `layout`, each with what to use instead, and what the prediction
    does not model."""
    out = []
    if shape.precision != "bf16":
        out.append(
            f"train.precision={shape.precision} is not modelled: the prediction is of bf16 "
            "(calibrated on bf16 runs); fp32 activations and gathered weights take about twice "
            "the memory and the matmuls run without bf16 tensor cores"
        )
    if shape.fp8 is not None and shape.fp8.enabled:
        out.append(
            "train.fp8 is not modelled: the prediction is of bf16 (measured on the proxy model, "
            "one H200: 1.07x bf16's tokens/s with the default layers, up to 1.31x with every "
            'FP8 layer; docs/benchmarks.md "FP8 training")'
        )
    if layout.tp > 1:
        out.append(
            f"TP{layout.tp} + SP has no communication overlap here (no async TP): every block "
            f"gathers and reduce-scatters its activations on the critical path. Measured on 2 "
            f"H200s: TP2+SP+EP2 12,284 tokens/s per GPU vs FSDP2 DP2 31,473 at the same batch "
            f"(docs/benchmarks.md); TP above 2 is extrapolated from that one run (a fixed cost "
            f"per block and micro-batch). Use FSDP + EP without TP "
            f"(model.tensor_model_parallel_size=1 model.sequence_parallel=false) unless a layer "
            f"does not fit."
        )
    if layout.pp > 1:
        out.append(
            f"PP{layout.pp}: uncalibrated (no pipeline run measured): the plan takes training's "
            f"stages and times {layout.pipeline_schedule}'s own order of forwards and backwards "
            "(its bubble and micro-batches in flight, with a backward of twice the forward; "
            'docs/parallelism.md "Performance model")'
        )
        if not layout.accumulate_unsharded:
            out.append(
                "train.fsdp_accumulate_unsharded=false has no effect under PP: the pipeline "
                "stages keep their weights gathered and accumulate unsharded gradients for the "
                "whole step (torch.distributed.pipelining reduces them once, at the end)"
            )
    if layout.cp > 1 and shape.longest <= 65536:
        out.append(
            f"CP{layout.cp} at {shape.longest} tokens: measured CP2 at 8192 tokens "
            "19,265 tokens/s per GPU vs DP2 31,473; CP pays off only where a sequence's "
            "activations do not fit (docs/benchmarks.md)"
        )
    if layout.ep > 1 and shape.ep_dispatcher != "overlap":
        out.append("EP without overlap: the all-to-all is on the critical path")
    if layout.ep > hw.gpus_per_node:
        out.append(
            f"EP{layout.ep} spans nodes: the all-to-all crosses the network "
            f"({hw.network_busbw / 1e9:.0f} GB/s per GPU assumed vs "
            f"{hw.nvlink_a2a_busbw / 1e9:.0f} inside a node)"
        )
    return out


def candidate_layouts(
    cfg: Nano3Config, world: int, shape: RunShape, *, include_pp: bool = False, max_micro_batch: int = 4
) -> list[Layout]:
    """Every layout the training code can build for `world` GPUs (TP, EP, CP powers of two,
    micro batch 1..max, with and without recomputation), PP only if `include_pp`."""
    out = []
    pows = [2**i for i in range(0, 12) if 2**i <= world]
    # CP only for long sequences (measured: CP2 at 8192 tokens costs 39% per GPU)
    cps = [c for c in pows if c <= 8] if shape.longest > 16384 else [1]
    for tp in [t for t in pows if t <= 8]:
        for cp in cps:
            for pp in [p for p in pows if p <= 8] if include_pp else [1]:
                if world % (tp * cp * pp):
                    continue
                for ep in [e for e in pows if e <= cfg.num_experts]:
                    for mb in range(1, max_micro_batch + 1):
                        for recompute in (False, True):
                            for unsharded in (True, False):
                                layout = Layout(world, tp, ep, cp, pp, mb, recompute, unsharded)
                                try:
                                    accum = validate_layout(cfg, layout, shape)
                                except PlanError:
                                    continue
                                if not unsharded and (accum == 1 or pp > 1):
                                    continue  # the same run as accumulate_unsharded
                                out.append(layout)
    return out


def no_layout_reason(cfg: Nano3Config, world: int, shape: RunShape, *, include_pp: bool = False) -> str:
    """Why `recommend` finds nothing on `world` GPUs: no layout of `candidate_layouts` can be
    built there (the reason of the plainest one, data parallel over all of them at micro batch
    1), the ones that fit are refused by training (`refusal`), or none fits in memory."""
    layouts = candidate_layouts(cfg, world, shape, include_pp=include_pp)
    if not layouts:
        try:
            validate_layout(cfg, Layout(world), shape)
        except PlanError as exc:
            return f"{NOTHING_BUILDS} on {world} GPUs (e.g. DP{world} mb1: {exc})"
        return f"{NOTHING_BUILDS} on {world} GPUs"  # pragma: no cover (DP-only builds: a candidate)
    for layout in layouts:
        if estimate_memory(cfg, layout, shape, H200, CALIBRATION, validate_layout(cfg, layout, shape)).fits:
            reason = refusal(cfg, layout, shape)
            if reason is not None:
                return f"the layouts that fit on {world} GPUs are ones training refuses (e.g. {layout.describe()}: {reason})"
    return f"no layout fits in the memory of {world} GPUs"


NOTHING_BUILDS = "no layout can be built"


def recommend(
    cfg: Nano3Config,
    world: int,
    shape: RunShape,
    hw: Hardware = H200,
    cal: Calibration = CALIBRATION,
    *,
    include_pp: bool = False,
) -> list[Plan]:
    """Plans of the layouts that fit and that training runs, fastest first (tokens/s per GPU)."""
    plans = []
    fitted_plain: set[tuple] = set()  # layouts that fit without recompute or resharding
    for layout in candidate_layouts(cfg, world, shape, include_pp=include_pp):
        key = (layout.tp, layout.ep, layout.cp, layout.pp, layout.micro_batch)
        if key in fitted_plain:
            continue  # recomputation or per-micro-batch resharding would only be slower
        plan = estimate(cfg, layout, shape, hw, cal)
        if plan.memory.fits and plan.implemented:
            plans.append(plan)
            if not layout.recompute and layout.accumulate_unsharded:
                fitted_plain.add(key)
    plans.sort(key=lambda p: (-p.tokens_per_second_per_gpu, p.memory.total))
    return plans


def shape_from_config(cfg, world: int | None = None) -> RunShape:
    """RunShape of a PretrainConfig (its `train` section)."""
    t = cfg.train
    return RunShape(
        seq_length=t.seq_length,
        global_batch_size=t.global_batch_size,
        shared_expert_overlap=t.moe_shared_expert_overlap,
        compute_weights="fp32" if t.compute_weights == "fp32" else "bf16",
        mixed_lengths=tuple((m.seq_length, float(m.weight)) for m in cfg.data.mixed_length_blends),
        blend_weight=float(cfg.data.blend_weight),
        precision=t.precision,
        fp8=t.fp8,
    )


def layout_from_config(cfg, world: int) -> Layout:
    p = cfg.model.parallel()
    return Layout(
        world=world,
        tp=p.tensor_model_parallel_size,
        ep=p.expert_model_parallel_size,
        cp=p.context_parallel_size,
        pp=p.pipeline_model_parallel_size,
        micro_batch=cfg.train.micro_batch_size,
        recompute=cfg.train.activation_recompute,
        accumulate_unsharded=cfg.train.fsdp_accumulate_unsharded,
        pipeline_schedule=p.pipeline_schedule,
        virtual_stages=p.virtual_pipeline_model_parallel_size,
        blocks_per_stage=None if p.pipeline_blocks_per_stage is None else tuple(p.pipeline_blocks_per_stage),
    )


def with_world(layout: Layout, world: int) -> Layout:
    return dataclasses.replace(layout, world=world)


def smallest_world(layout: Layout) -> int:
    """The fewest GPUs the layout's model-parallel sizes need."""
    return layout.pp * math.lcm(layout.tp * layout.cp, layout.ep)
