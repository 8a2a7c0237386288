"""The pieces a training step is made of: the model as training builds it (`build_model`,
compute weights, recomputation), `train_step` (micro-batches with gradient accumulation,
gradient sync and clipping, AdamW or a skipped non-finite step) and `evaluate`.

The run that puts them together (resume, schedule, expert-bias update, logging, evaluation,
checkpoints, signals) is `train/trainer.py`'s `Trainer`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.fsdp import FSDPModule

from nemotron.distributed.apply import parallelize, restore_reshard_after_forward
from nemotron.distributed.config import ParallelismConfig
from nemotron.distributed.mesh import build_mesh
from nemotron.distributed.parallel_dims import ParallelDims
from nemotron.distributed.utils import (
    grad_norm,
    loss_tokens,
    padding_mask,
    reduce_token_loss,
    scale_grads_to_norm_,
    token_loss_weights,
)
from nemotron.kernels.fp8 import reuse_quantized_weights, summed_weight_grads
from nemotron.models.nano3.model import Block, Nano3ForCausalLM
from nemotron.models.nano3.moe import MoE, set_shared_expert_overlap
from nemotron.train.config import COMPUTE_WEIGHTS
from nemotron.train.expert_grads import apply_float32_expert_grads
from nemotron.train.fp8 import Fp8Summary, apply_fp8


@dataclass
class StepResult:
    loss: float  # mean training loss (incl. the balance loss term) over the step's micro-batches
    lm_loss: float
    grad_norm: float
    finite: bool


@dataclass
class Parallel:
    """What the loop needs to know about the layout (single process: all defaults)."""

    dp_rank: int = 0
    dp_size: int = 1
    dp_group: Any = None  # ranks holding different tokens (DP x CP): reduce losses over it
    balancing_group: Any = None
    mesh: Any = None
    cp_rank: int = 0
    cp_size: int = 1
    sequence_multiple: int = 1  # sequence lengths must split into this many pieces (2*CP*TP)
    pipeline: Any = None  # distributed.pipeline.Pipeline: this rank's stages (PP > 1)

    @property
    def loss_group_size(self) -> int:
        return self.dp_size * self.cp_size

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


# ---------------------------------------------------------------------------------------------
# Setup


def ignored_layout(cfg) -> str | None:
    """The model-parallel sizes a single process cannot apply (it trains the whole model on one
    device), e.g. "TP8 EP8 SP", or None when there are none."""
    p = cfg.model.parallel()
    sizes = [
        f"{name}{size}"
        for name, size in (
            ("TP", p.tensor_model_parallel_size),
            ("PP", p.pipeline_model_parallel_size),
            ("EP", p.expert_model_parallel_size),
            ("CP", p.context_parallel_size),
        )
        if size > 1
    ]
    if p.sequence_parallel and p.tensor_model_parallel_size > 1:
        sizes.append("SP")
    return " ".join(sizes) or None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available")
        index = 0
        if dist.is_available() and dist.is_initialized():
            index = dist.get_rank() % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)


def apply_activation_recompute(model: torch.nn.Module) -> None:
    """Recompute each residual block's activations in backward (non-reentrant checkpointing,
    during which the MoE routers do not count tokens again)."""
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(
            checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT
        ),
        check_fn=lambda module: isinstance(module, Block),
    )


# -- train.compile --------------------------------------------------------------------------------
# Graphs the blocks' shared code may hold (`compile_blocks`): one per block kind (Mamba,
# attention, MLP; a MoE block's norm and shared expert), sequence length (the long-context mix),
# micro-batch size (a last partial one) and mode (training, evaluation); Dynamo's default of 8
# per code object would send the rest back to eager without an error. As `apply_fp8` for its
# linears.
BLOCK_RECOMPILE_LIMIT = 64


def compiled_parts(block: torch.nn.Module) -> list[torch.nn.Module]:
    """What `compile_blocks` compiles of one entry of `backbone.layers` (a `Block`, or its
    checkpoint wrapper under activation recompute): the entry itself, or of a MoE block only its
    parts of fixed shape, its norm and its shared expert. The MoE's routed path (router,
    dispatch, experts, combine, balance loss) runs eagerly: its sizes follow the routing (the
    rows an expert-parallel rank receives, the per-expert split of the CPU loop), so compiled
    with static shapes every new routing was a new graph (5 to 12 per step of the tiny model
    under TP2 + EP2, until the recompile limit sent it back to eager), and symbolic sizes
    recursed in DTensor's sharding propagation (`compile_blocks`). On CUDA its work is already
    in fused kernels (grouped GEMM; Triton top-k, squared ReLU and combine). The router stays eager too: it counts the tokens for
    the balancing bias only outside a backward pass (`moe._inside_backward`), which a compiled
    graph cannot tell, so a compiled router would count them again in an activation recompute."""
    inner = block._checkpoint_wrapped_module if isinstance(block, CheckpointWrapper) else block
    if not isinstance(inner, Block):
        raise TypeError(f"backbone.layers holds a {type(inner).__name__}, not a Block")
    if not isinstance(inner.mixer, MoE):
        return [block]
    shared = inner.mixer.shared_experts
    return [inner.norm] + ([shared] if shared is not None else [])


def compile_blocks(model: torch.nn.Module) -> None:
    """Compile every residual block of `model` in place (`compiled_parts`: a MoE block's parts
    of fixed shape): `nn.Module.compile`, so each module keeps its own forward and its
    parameter names (no `_orig_mod.` in checkpoints). `model` is a `Nano3ForCausalLM` (or a
    pipeline part) or a pipeline rank's `LocalStages`, whose `backbone.layers` are the very
    modules its stages run. A block under activation recompute is its checkpoint wrapper
    (compiled around the checkpoint, as the whole-model compile sees it; a MoE block's parts
    inside it). Static shapes (`dynamic=False`): under tensor parallelism a recompile with
    symbolic sizes recursed without end in DTensor's sharding propagation (RecursionError in
    every rank's first backward, torch 2.13; as in pytorch/pytorch#152954); a new shape is a
    new graph instead, which only the routed experts' varying sizes made unbounded."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_RECOMPILE_LIMIT)
    layers = model.get_submodule("backbone.layers")
    assert isinstance(layers, torch.nn.ModuleDict)  # keyed by block index (models/nano3/model.py)
    for block in layers.values():
        for part in compiled_parts(block):
            part.compile(dynamic=False)


def compile_model(model: torch.nn.Module, parallel: Parallel) -> torch.nn.Module:
    """`train.compile`: the module the loop trains. Tensor or pipeline parallel: each block
    compiled in place (`compile_blocks`; a MoE block by its parts), `model` itself returned; the embeddings, final norm
    and loss run eagerly (the vocabulary-parallel embedding cannot be traced: the masked
    partial output of torch's `RowwiseParallel` holds a real tensor inside the fake-tensor
    trace, which failed every rank). One process, DP, EP, CP: the whole model
    (`torch.compile(model)`, a wrapper whose names carry `_orig_mod.`: the trainer saves and
    steps `model`), as the measured single-GPU runs compile it (docs/performance.md)."""
    tp = parallel.mesh.dims.tp if parallel.mesh is not None else 1
    if tp > 1 or parallel.pipeline is not None:
        compile_blocks(model)
        return model
    # torch.compile of a module is a module (OptimizedModule); its stub says only Callable
    return cast(torch.nn.Module, torch.compile(model))


def check_compute_weights(train) -> None:
    """`train.compute_weights` (a TrainConfig's) is a known value that fits `train.precision`."""
    value = train.compute_weights
    if value not in COMPUTE_WEIGHTS:
        raise ValueError(f"train.compute_weights={value!r} is not one of {list(COMPUTE_WEIGHTS)}")
    if value == "bf16" and train.precision != "bf16":
        raise ValueError(
            f"train.compute_weights=bf16 needs train.precision=bf16, got "
            f"{train.precision!r} (bf16 compute weights run under bf16 autocast)"
        )


def resolve_compute_weights(train, device: torch.device, world: int, grad_accumulation: int = 1) -> str:
    """ "fp32" or "bf16": `train.compute_weights`, with "auto" = bf16 on CUDA with precision bf16
    when distributed or accumulating gradients over micro-batches, fp32 otherwise.

    Why the accumulation matters in one process: bf16 weights are gathered (copied and cast)
    once per step and gradients accumulate unsharded in fp32 (`fsdp_micro_batches`), which beats
    autocast's per-micro-batch weight casts from 2 micro-batches per step on; with one
    micro-batch per step FSDP2's own copies cost more than the casts they save (measured on an
    H200, docs/performance.md)."""
    check_compute_weights(train)
    if train.compute_weights != "auto":
        return train.compute_weights
    if device.type != "cuda" or train.precision != "bf16":
        return "fp32"
    return "bf16" if world > 1 or grad_accumulation > 1 else "fp32"


def build_model(
    cfg, device: torch.device, mesh=None, compute_weights: str | None = None
) -> tuple[torch.nn.Module, Parallel]:
    """The model on `device` with fp32 master weights: one process with fp32 compute weights
    trains a plain module; otherwise FSDP2 (`distributed.apply.parallelize`) shards it, with bf16
    compute weights per `compute_weights` ("fp32" | "bf16"; None: resolve
    `train.compute_weights` here). One process with bf16 compute weights uses a one-rank mesh
    and needs a (one-rank) process group, which `pretrain` creates."""

    arch = cfg.model.arch()
    torch.manual_seed(cfg.train.seed)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    weights = compute_weights or resolve_compute_weights(
        cfg.train, device, world, max(1, cfg.train.global_batch_size // max(1, cfg.train.micro_batch_size))
    )
    if world == 1 and weights == "fp32":
        with torch.device(device):
            model = Nano3ForCausalLM(arch, fused_loss=cfg.train.fused_kernels)
        # Initialise through reset_parameters under the seed, exactly as the sharded path does,
        # so one process and N data-parallel ranks start from the same weights.
        torch.manual_seed(cfg.train.seed)
        model.reset_parameters()
        set_shared_expert_overlap(model, cfg.train.moe_shared_expert_overlap)
        apply_fp8_if_enabled(model, cfg, device)
        if cfg.train.activation_recompute:
            apply_activation_recompute(model)
        return model, Parallel()
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "train.compute_weights=bf16 in one process needs a one-rank process group (FSDP2 on "
            "a one-device mesh): run through pretrain(), or inside "
            "nemotron.distributed.utils.launcher_process_group(device_type, one_rank=True)"
        )

    # One process trains the whole model: the configured model-parallel sizes do not apply.
    layout = cfg.model.parallel() if world > 1 else ParallelismConfig()
    if mesh is None:
        dims = ParallelDims.from_config(layout, world, arch)
        mesh = build_mesh(dims, device.type)
    parallel = Parallel(
        dp_rank=mesh.dp_rank,
        dp_size=mesh.dp_size,
        dp_group=mesh.loss_group,
        balancing_group=mesh.balancing_group,
        mesh=mesh,
        cp_rank=mesh.cp_rank,
        cp_size=mesh.cp_size,
        sequence_multiple=mesh.dims.sequence_shards,
    )
    if mesh.dims.pp > 1:
        parallel.pipeline = _build_pipeline(cfg, device, mesh, layout, weights == "bf16")
        return parallel.pipeline.local, parallel

    # Built on the meta device and materialised shard by shard: a rank never holds the full model.
    with torch.device("meta"):
        model = Nano3ForCausalLM(arch, fused_loss=cfg.train.fused_kernels)
    set_shared_expert_overlap(model, cfg.train.moe_shared_expert_overlap)
    # module swaps, before sharding (as torchao needs)
    apply_fp8_if_enabled(model, cfg, device, mesh.dims.tp)
    apply_expert_grads_if_enabled(model, cfg, weights)
    if cfg.train.activation_recompute:  # before sharding, as torchtitan does
        apply_activation_recompute(model)
    # One rank: resharding after forward would only re-gather (copy) the weights in backward.
    model = parallelize(
        model, mesh, layout, mixed_precision=weights == "bf16", reshard_after_forward=world > 1
    )
    model.to_empty(device=device)
    torch.manual_seed(cfg.train.seed)
    model.reset_parameters()  # the same weights as one process under this seed
    return model, parallel


def apply_fp8_if_enabled(model: torch.nn.Module, cfg, device: torch.device, tensor_parallel: int = 1):
    """`train.fp8`: swap the chosen layers for their FP8 versions (train/fp8.py) for a model
    to be sharded over `tensor_parallel` TP ranks; the summary is kept on the model as
    `fp8_summary` (None when FP8 is off)."""
    summary = None
    if cfg.train.fp8.enabled:
        summary = apply_fp8(model, cfg.train.fp8, device, tensor_parallel, cfg.train.experts_float32_grads)
    # nn.Module.__setattr__ is annotated for tensors and modules; other values are kept as-is
    model.fp8_summary = summary  # type: ignore[assignment]
    return summary


def apply_expert_grads_if_enabled(model: torch.nn.Module, cfg, compute_weights: str) -> int:
    """`train.experts_float32_grads` with BF16 compute weights (FSDP2): the BF16 routed experts
    swapped for ones with float32 weight gradients (train/expert_grads.py), before sharding.
    Returns how many MoE layers were swapped."""
    if not (cfg.train.experts_float32_grads and compute_weights == "bf16"):
        return 0
    return apply_float32_expert_grads(model)


def _build_pipeline(cfg, device: torch.device, mesh, layout, mixed_precision: bool):
    """This rank's pipeline stages (`distributed.pipeline`): each part is built like the whole
    model below (meta device, recompute, shared-expert overlap), parallelised on the stage's
    mesh and initialised to its share of the single-process weights."""
    from nemotron.distributed.pipeline import build_pipeline
    from nemotron.distributed.pipeline_split import run_lengths
    from nemotron.models.nano3.model import Nano3ForCausalLM
    from nemotron.models.nano3.moe import set_shared_expert_overlap

    def make_part(blocks: range) -> Nano3ForCausalLM:
        with torch.device("meta"):
            part = Nano3ForCausalLM(cfg.model.arch(), fused_loss=cfg.train.fused_kernels, blocks=blocks)
        set_shared_expert_overlap(part, cfg.train.moe_shared_expert_overlap)
        apply_fp8_if_enabled(part, cfg, device, mesh.dims.tp)
        apply_expert_grads_if_enabled(part, cfg, "bf16" if mixed_precision else "fp32")
        if cfg.train.activation_recompute:
            apply_activation_recompute(part)
        return part

    pipeline = build_pipeline(
        cfg.model.arch(),
        layout,
        mesh,
        device,
        lengths=run_lengths(cfg.train.seq_length, cfg.data),
        make_part=make_part,
        mixed_precision=mixed_precision,
        seed=cfg.train.seed,
    )
    summary = None
    if cfg.train.fp8.enabled:
        # the run announces what FP8 converted (`Trainer._announce_start`, rank 0: its own
        # stages only): every stage's summary, gathered over the pipeline ranks
        mine = [(stage, part.fp8_summary) for stage, part in zip(pipeline.stage_ids, pipeline.parts)]
        every: list[Any] = [None] * mesh.dims.pp
        dist.all_gather_object(every, mine, group=mesh.pp_mesh.get_group())
        summary = Fp8Summary.merge([s for _, s in sorted((p for r in every for p in r), key=lambda p: p[0])])
    pipeline.local.fp8_summary = summary  # type: ignore[assignment]  # as `apply_fp8_if_enabled`
    return pipeline


def autocast_context(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"train.precision {precision!r} is not one of ('bf16', 'fp32')")


# ---------------------------------------------------------------------------------------------
# One step


# The name prefix of the ranges `train_step` marks in profiler traces (torch.profiler / Kineto):
# which phase of the step the host is in (`benchmarks/train_throughput.py` charges the GPU's idle
# time to them). Outside a profiler a range costs one dispatcher call.
STEP_PHASE_PREFIX = "train_step: "


def step_phase(name: str) -> torch.profiler.record_function:
    """A profiler range named `STEP_PHASE_PREFIX + name` around one phase of the step."""
    return torch.profiler.record_function(STEP_PHASE_PREFIX + name)


@contextlib.contextmanager
def fsdp_micro_batches(model: torch.nn.Module, count: int, accumulate_unsharded: bool = True):
    """Yields `prepare(i)`, to call before micro-batch i of a step of `count` micro-batches.

    Under FSDP2 with `accumulate_unsharded` (train.fsdp_accumulate_unsharded) and count > 1,
    the micro-batches before the last keep every unit's gathered (bf16) weights after forward
    and backward and accumulate unsharded fp32 gradients without reducing them; the last
    reduce-scatters the accumulated gradients and reshards after backward, so the step ends as
    without this (sharded parameters, reduced sharded gradients), having gathered the weights
    and reduced the gradients once instead of once per micro-batch. The last micro-batch's
    forward keeps the (already gathered) weights too, so its backward gathers nothing; the
    configured reshard-after-forward is back after the step. Weight-gradient products that can
    sum into their output (the routed experts' FP8 ones) do so meanwhile, handing FSDP2 the
    float32 sum with the last micro-batch (`kernels.fp8.summed_weight_grads`). Otherwise
    `prepare` does nothing."""
    root = getattr(model, "_orig_mod", model)  # under torch.compile
    if not (accumulate_unsharded and count > 1 and isinstance(root, FSDPModule)):
        yield lambda index: None
        return
    # Only for a model built by `distributed.apply.parallelize`, which records what to restore.
    keep_after_forward = hasattr(root, "fsdp_reshard_after_forward") and hasattr(
        root, "set_reshard_after_forward"
    )
    if keep_after_forward:
        root.set_reshard_after_forward(False)
    with summed_weight_grads() as sums:

        def prepare(index: int) -> None:
            last = index == count - 1
            root.set_requires_gradient_sync(last)
            root.set_reshard_after_backward(last)
            sums.last = last

        try:
            yield prepare
        finally:
            root.set_requires_gradient_sync(True)
            root.set_reshard_after_backward(True)
            if keep_after_forward:
                restore_reshard_after_forward(root)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    precision: str,
    grad_clip: float,
    parallel: Parallel | None = None,
    fsdp_accumulate_unsharded: bool = True,
    reuse_fp8_weights: bool = False,
) -> StepResult:
    """Forward/backward over the micro-batches, gradient sync + clip, and the AdamW step unless
    the loss or gradient norm is non-finite (then the parameters are left untouched).

    The LM loss (gradient and logged value) is the mean over every loss token of the step's
    global batch, all micro-batches and data-parallel ranks together (`token_loss_weights`);
    the sequence balance loss, a mean over sequences, is averaged over micro-batches.
    `fsdp_accumulate_unsharded`: see `fsdp_micro_batches`. `reuse_fp8_weights`
    (`train.fp8.reuse_weights`): the FP8 layers quantize each weight once for all micro-batches
    (`kernels.fp8.reuse_quantized_weights`, closed before the optimizer step)."""
    parallel = parallel or Parallel()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    counts = [loss_tokens(b["labels"], b["loss_mask"]) for b in micro_batches]
    weights, _ = token_loss_weights(counts, parallel.mesh)
    lm_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum of token losses
    balance_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = len(micro_batches)
    pipeline = parallel.pipeline
    if pipeline is not None:
        with reuse_quantized_weights(reuse_fp8_weights):
            lm_sum, balance_sum = pipeline_forward_backward(
                pipeline, micro_batches, weights, counts, device, precision, training=True
            )
    else:
        with (
            reuse_quantized_weights(reuse_fp8_weights),
            fsdp_micro_batches(model, n, fsdp_accumulate_unsharded) as prepare,
        ):
            for index, (batch, weight, count) in enumerate(zip(micro_batches, weights, counts)):
                with step_phase(f"micro-batch {index} forward"):
                    prepare(index)
                    tokens = batch["tokens"].to(device, non_blocking=True)
                    labels = batch["labels"].to(device, non_blocking=True)
                    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
                    padding = padding_mask(batch["labels"])
                    if padding is not None:
                        padding = padding.to(device, non_blocking=True)
                    with autocast_context(precision, device):
                        out = model(tokens, labels=labels, loss_mask=loss_mask, padding_mask=padding)
                    balance = out.loss - out.lm_loss  # coefficient x sequence balance loss (0 without MoE)
                with step_phase(f"micro-batch {index} backward"):
                    (out.lm_loss * weight + balance / n).backward()
                lm_sum += out.lm_loss.detach().double() * float(count)
                balance_sum += balance.detach().double()
    # Under FSDP2 the gradients arrive already averaged over data-parallel ranks.
    with step_phase("gradient norm and clipping"):
        params = [p for p in model.parameters() if p.requires_grad]
        norm = float(grad_norm(params)) if pipeline is None else pipeline.grad_norm(params)
        # A non-finite norm clips nothing: the step is skipped below.
        scale_grads_to_norm_(params, grad_clip, norm)
    lm_loss = reduce_token_loss(lm_sum, sum(counts), parallel.mesh)
    # The balance term is a mean over sequences: average it over all micro-batches of all ranks.
    loss = lm_loss + reduce_token_loss(balance_sum, n, parallel.mesh)
    if pipeline is not None:  # the values of the last stage, on every rank
        lm_loss, loss = pipeline.from_last_stage([lm_loss, loss])
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite:
        with step_phase("optimizer step"):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, lm_loss, norm, finite)


@torch.no_grad()
def evaluate(
    model,
    micro_batches,
    *,
    device,
    precision,
    parallel: Parallel | None = None,
    reuse_fp8_weights: bool = False,
) -> float:
    """LM loss averaged over every loss token of the batches (of all data-parallel ranks
    together). Grad-free, so routers count nothing; the counters are also restored
    afterwards, so evaluation can never leak into the balance update. `reuse_fp8_weights`: as
    in `train_step`."""
    parallel = parallel or Parallel()
    moe = model.moe_layers() if hasattr(model, "moe_layers") else []
    saved = [layer.router.tokens_per_expert.clone() for layer in moe]
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)  # sum of token losses
    tokens = 0.0
    with reuse_quantized_weights(reuse_fp8_weights):
        if parallel.pipeline is not None:
            counts = [loss_tokens(b["labels"], b["loss_mask"]) for b in micro_batches]
            total, _ = pipeline_forward_backward(
                parallel.pipeline,
                micro_batches,
                [0.0] * len(counts),
                counts,
                device,
                precision,
                training=False,
            )
            tokens = float(sum(counts))
        else:
            for batch in micro_batches:
                with autocast_context(precision, device):
                    out = model(
                        batch["tokens"].to(device),
                        labels=batch["labels"].to(device),
                        loss_mask=batch["loss_mask"].to(device),
                    )
                count = float(loss_tokens(batch["labels"], batch["loss_mask"]))
                total += out.lm_loss.double() * count
                tokens += count
    for layer, counts in zip(moe, saved):
        layer.router.tokens_per_expert.copy_(counts)
    model.train(was_training)
    loss = reduce_token_loss(total, tokens, parallel.mesh)
    if parallel.pipeline is not None:
        loss = parallel.pipeline.from_last_stage([loss])[0]
    return loss


def pipeline_forward_backward(
    pipeline, micro_batches, weights, counts, device, precision, *, training: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batches through the pipeline's stages (forward + backward when `training`):
    -> (sum of token losses, sum of coefficient x balance loss), nonzero on the last stage."""
    coeff = pipeline.parts[0].config.moe_seq_aux_loss_coeff if training else 0.0
    n = len(micro_batches)
    with autocast_context(precision, device):
        scores = pipeline.run(micro_batches, weights, coeff / n, training)
    lm_sum = torch.zeros((), dtype=torch.float64)
    balance_sum = torch.zeros((), dtype=torch.float64)
    for i, (lm_loss, aux_loss) in scores.items():
        lm_sum += lm_loss.double().cpu() * float(counts[i])
        balance_sum += coeff * aux_loss.double().cpu()
    return lm_sum, balance_sum
