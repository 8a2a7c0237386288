"""`pretrain(cfg, job_dir)`: the Nemotron 3 Nano pretraining loop.

One step: pick the phase and learning rate from the tokens consumed, run the micro-batches
(gradient accumulation), sync and clip gradients, step AdamW (or skip a non-finite step), update
the expert biases from the step's routing counts, log, evaluate, checkpoint. Everything a
resumed run needs is in the checkpoint, so a run killed at any point continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import resource
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemotron.artifacts.model import (
    MODEL_ARTIFACT_FILE, build_model_artifact, data_artifact_record, manifest_json,
)
from nemotron.distributed.utils import (
    grad_norm, launcher_process_group, loss_tokens, reduce_token_loss, token_loss_weights,
)
from nemotron.train import balancing, flops
from nemotron.train.checkpoint import CONFIG_FILE, Checkpointer, load_checkpoint, resolve_checkpoint
from nemotron.train.config import COMPUTE_WEIGHTS
from nemotron.train.data import LoaderState, TrainingData, plan_batches, unigram_entropy
from nemotron.train.metrics import EventHook, MetricsLogger
from nemotron.train.optimizer import build_optimizer, set_learning_rate
from nemotron.train.schedule import learning_rate, validate_schedule


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


@dataclass
class TrainSummary:
    steps: int
    tokens: int
    final_loss: float | None
    checkpoint: str | None
    status: str = "completed"  # completed | interrupted (signal: checkpoint saved, run resumable)
    valid_loss: float | None = None
    test_loss: float | None = None
    skipped_steps: int = 0
    balance_max_over_mean: float | None = None  # worst layer, last step
    balance_bias_range: float | None = None
    unigram_entropy: float | None = None
    tokens_per_second: float | None = None
    resumed_from: str | None = None
    finetuned_from: str | None = None  # checkpoint.finetune: the weights this run started from


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
    sizes = [f"{name}{size}" for name, size in (
        ("TP", p.tensor_model_parallel_size), ("PP", p.pipeline_model_parallel_size),
        ("EP", p.expert_model_parallel_size), ("CP", p.context_parallel_size)) if size > 1]
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
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper,
    )

    from nemotron.models.nano3.model import Block

    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper,
                                                checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda module: isinstance(module, Block),
    )


def check_compute_weights(train) -> None:
    """`train.compute_weights` (a TrainConfig's) is a known value that fits `train.precision`."""
    value = train.compute_weights
    if value not in COMPUTE_WEIGHTS:
        raise ValueError(f"train.compute_weights={value!r} is not one of {list(COMPUTE_WEIGHTS)}")
    if value == "bf16" and train.precision != "bf16":
        raise ValueError(f"train.compute_weights=bf16 needs train.precision=bf16, got "
                         f"{train.precision!r} (bf16 compute weights run under bf16 autocast)")


def resolve_compute_weights(train, device: torch.device, world: int, grad_accumulation: int = 1) -> str:
    """"fp32" or "bf16": `train.compute_weights`, with "auto" = bf16 on CUDA with precision bf16
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


def _one_process_accumulation(cfg) -> int:
    """Micro-batches per step when one process trains (what `auto` compute weights look at
    there; with several ranks it is bf16 anyway)."""
    return max(1, cfg.train.global_batch_size // max(1, cfg.train.micro_batch_size))


def build_model(cfg, device: torch.device, mesh=None) -> tuple[torch.nn.Module, Parallel]:
    """The model on `device` with fp32 master weights: one process with fp32 compute weights
    trains a plain module; otherwise FSDP2 (`distributed.parallelize`) shards it, with bf16
    compute weights per `train.compute_weights`. One process with bf16 compute weights uses a
    one-rank mesh and needs a (one-rank) process group, which `pretrain` creates."""
    from nemotron.models.nano3.model import Nano3ForCausalLM
    from nemotron.models.nano3.moe import set_shared_expert_overlap

    arch = cfg.model.arch()
    torch.manual_seed(cfg.train.seed)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    weights = resolve_compute_weights(cfg.train, device, world, _one_process_accumulation(cfg))
    if world == 1 and weights == "fp32":
        with torch.device(device):
            model = Nano3ForCausalLM(arch, fused_loss=cfg.train.fused_kernels)
        # Initialise through reset_parameters under the seed, exactly as the sharded path does,
        # so one process and N data-parallel ranks start from the same weights.
        torch.manual_seed(cfg.train.seed)
        model.reset_parameters()
        set_shared_expert_overlap(model, cfg.train.moe_shared_expert_overlap)
        if cfg.train.activation_recompute:
            apply_activation_recompute(model)
        return model, Parallel()
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "train.compute_weights=bf16 in one process needs a one-rank process group (FSDP2 on "
            "a one-device mesh): run through pretrain(), or inside "
            "nemotron.distributed.utils.launcher_process_group(device_type, one_rank=True)")
    from nemotron.distributed.config import ParallelismConfig
    from nemotron.distributed.mesh import build_mesh
    from nemotron.distributed.parallel_dims import ParallelDims

    # One process trains the whole model: the configured model-parallel sizes do not apply.
    layout = cfg.model.parallel() if world > 1 else ParallelismConfig()
    if mesh is None:
        dims = ParallelDims.from_config(layout, world, arch)
        mesh = build_mesh(dims, device.type)
    parallel = Parallel(dp_rank=mesh.dp_rank, dp_size=mesh.dp_size, dp_group=mesh.loss_group,
                        balancing_group=mesh.balancing_group, mesh=mesh, cp_rank=mesh.cp_rank,
                        cp_size=mesh.cp_size, sequence_multiple=mesh.dims.sequence_shards)
    if mesh.dims.pp > 1:
        parallel.pipeline = _build_pipeline(cfg, device, mesh, layout, weights == "bf16")
        return parallel.pipeline.local, parallel
    from nemotron.distributed.parallelize import parallelize

    # Built on the meta device and materialised shard by shard: a rank never holds the full model.
    with torch.device("meta"):
        model = Nano3ForCausalLM(arch, fused_loss=cfg.train.fused_kernels)
    set_shared_expert_overlap(model, cfg.train.moe_shared_expert_overlap)
    if cfg.train.activation_recompute:  # before sharding, as torchtitan does
        apply_activation_recompute(model)
    # One rank: resharding after forward would only re-gather (copy) the weights in backward.
    model = parallelize(model, mesh, layout, mixed_precision=weights == "bf16",
                        reshard_after_forward=world > 1)
    model.to_empty(device=device)
    torch.manual_seed(cfg.train.seed)
    model.reset_parameters()  # the same weights as one process under this seed
    return model, parallel


def _build_pipeline(cfg, device: torch.device, mesh, layout, mixed_precision: bool):
    """This rank's pipeline stages (`distributed.pipeline`): each part is built like the whole
    model below (meta device, recompute, shared-expert overlap), parallelised on the stage's
    mesh and initialised to its share of the single-process weights."""
    from nemotron.distributed.pipeline import build_pipeline
    from nemotron.distributed.pipeline_split import run_lengths
    from nemotron.models.nano3.model import Nano3ForCausalLM
    from nemotron.models.nano3.moe import set_shared_expert_overlap

    if cfg.train.compile:
        raise ValueError("train.compile with model.pipeline_model_parallel_size > 1 is not "
                         "supported; set train.compile=false")

    def make_part(blocks: range) -> torch.nn.Module:
        with torch.device("meta"):
            part = Nano3ForCausalLM(cfg.model.arch(), fused_loss=cfg.train.fused_kernels,
                                    blocks=blocks)
        set_shared_expert_overlap(part, cfg.train.moe_shared_expert_overlap)
        if cfg.train.activation_recompute:
            apply_activation_recompute(part)
        return part

    return build_pipeline(cfg.model.arch(), layout, mesh, device,
                          lengths=run_lengths(cfg.train.seq_length, cfg.data),
                          make_part=make_part, mixed_precision=mixed_precision,
                          seed=cfg.train.seed)


def autocast_context(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"train.precision {precision!r} is not one of ('bf16', 'fp32')")


# ---------------------------------------------------------------------------------------------
# One step


def _grads_by_mesh(params: list[torch.nn.Parameter]) -> dict[Any, list[torch.Tensor]]:
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    return by_mesh


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
    configured reshard-after-forward is back after the step. Otherwise `prepare` does nothing."""
    from torch.distributed.fsdp import FSDPModule

    root = getattr(model, "_orig_mod", model)  # under torch.compile
    if not (accumulate_unsharded and count > 1 and isinstance(root, FSDPModule)):
        yield lambda index: None
        return
    from nemotron.distributed.parallelize import restore_reshard_after_forward

    def prepare(index: int) -> None:
        last = index == count - 1
        root.set_requires_gradient_sync(last)
        root.set_reshard_after_backward(last)

    # Only for a model built by `distributed.parallelize`, which records what to restore.
    keep_after_forward = (hasattr(root, "fsdp_reshard_after_forward")
                          and hasattr(root, "set_reshard_after_forward"))
    if keep_after_forward:
        root.set_reshard_after_forward(False)
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
) -> StepResult:
    """Forward/backward over the micro-batches, gradient sync + clip, and the AdamW step unless
    the loss or gradient norm is non-finite (then the parameters are left untouched).

    The LM loss (gradient and logged value) is the mean over every loss token of the step's
    global batch, all micro-batches and data-parallel ranks together (`token_loss_weights`);
    the sequence balance loss, a mean over sequences, is averaged over micro-batches.
    `fsdp_accumulate_unsharded`: see `fsdp_micro_batches`."""
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
        lm_sum, balance_sum = pipeline_forward_backward(pipeline, micro_batches, weights, counts,
                                                        device, precision, training=True)
    else:
        with fsdp_micro_batches(model, n, fsdp_accumulate_unsharded) as prepare:
            for index, (batch, weight, count) in enumerate(zip(micro_batches, weights, counts)):
                prepare(index)
                tokens = batch["tokens"].to(device, non_blocking=True)
                labels = batch["labels"].to(device, non_blocking=True)
                loss_mask = batch["loss_mask"].to(device, non_blocking=True)
                with autocast_context(precision, device):
                    out = model(tokens, labels=labels, loss_mask=loss_mask)
                balance = out.loss - out.lm_loss  # coefficient x sequence balance loss (0 without MoE)
                (out.lm_loss * weight + balance / n).backward()
                lm_sum += out.lm_loss.detach().double() * float(count)
                balance_sum += balance.detach().double()
    # Under FSDP2 the gradients arrive already averaged over data-parallel ranks.
    params = [p for p in model.parameters() if p.requires_grad]
    norm = float(grad_norm(params)) if pipeline is None else pipeline.grad_norm(params)
    if grad_clip > 0 and math.isfinite(norm) and norm > grad_clip:
        scale = grad_clip / (norm + 1e-6)
        for group in _grads_by_mesh(params).values():  # one mesh per foreach call
            torch._foreach_mul_(group, scale)
    lm_loss = reduce_token_loss(lm_sum, sum(counts), parallel.mesh)
    # The balance term is a mean over sequences: average it over all micro-batches of all ranks.
    loss = lm_loss + reduce_token_loss(balance_sum, n, parallel.mesh)
    if pipeline is not None:  # the values of the last stage, on every rank
        lm_loss, loss = pipeline.from_last_stage([lm_loss, loss])
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, lm_loss, norm, finite)


@torch.no_grad()
def evaluate(model, micro_batches, *, device, precision, parallel: Parallel | None = None) -> float:
    """LM loss averaged over every loss token of the batches (of all data-parallel ranks
    together). Grad-free, so routers count nothing; the counters are also restored
    afterwards, so evaluation can never leak into the balance update."""
    parallel = parallel or Parallel()
    moe = model.moe_layers() if hasattr(model, "moe_layers") else []
    saved = [layer.router.tokens_per_expert.clone() for layer in moe]
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)  # sum of token losses
    tokens = 0.0
    if parallel.pipeline is not None:
        counts = [loss_tokens(b["labels"], b["loss_mask"]) for b in micro_batches]
        total, _ = pipeline_forward_backward(parallel.pipeline, micro_batches, [0.0] * len(counts),
                                             counts, device, precision, training=False)
        tokens = float(sum(counts))
    else:
        for batch in micro_batches:
            with autocast_context(precision, device):
                out = model(batch["tokens"].to(device), labels=batch["labels"].to(device),
                            loss_mask=batch["loss_mask"].to(device))
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


def pipeline_forward_backward(pipeline, micro_batches, weights, counts, device, precision, *,
                              training: bool) -> tuple[torch.Tensor, torch.Tensor]:
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


# ---------------------------------------------------------------------------------------------
# Signals


class StopRequest:
    """SIGTERM / SIGUSR1 (Slurm preemption) ask the loop to checkpoint and return."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, parallel: Parallel) -> bool:
        """True on every rank once any rank got a signal (so all save together)."""
        flag = torch.tensor(1 if self.signum is not None else 0)
        if parallel.distributed:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ---------------------------------------------------------------------------------------------
# The run


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _config_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg))


def pretrain(cfg, job_dir: str | Path, *, on_event: EventHook | None = None, mesh=None) -> TrainSummary:
    """Train per `cfg` (a PretrainConfig), writing metrics into `job_dir` and checkpoints into
    `cfg.checkpoint.save`. `on_event(kind, payload)` receives start / train / eval / test /
    checkpoint / end events (the CLI draws its progress bar from them).

    Under torchrun the processes join one process group here (unless the caller already did)."""
    from nemotron.distributed.parallel_dims import check_pipeline

    check_pipeline(cfg.model.parallel(), cfg.model.arch())  # before any process group or model exists
    device_type = cfg.train.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    # bf16 compute weights in one process: FSDP2 on a one-rank mesh needs a process group.
    one_rank = resolve_compute_weights(cfg.train, torch.device(device_type), 1,
                                       _one_process_accumulation(cfg)) == "bf16"
    with launcher_process_group(device_type, one_rank=one_rank):
        return _pretrain(cfg, job_dir, on_event=on_event, mesh=mesh)


def _pretrain(cfg, job_dir: str | Path, *, on_event: EventHook | None, mesh) -> TrainSummary:
    job_dir = Path(job_dir)
    validate_schedule(cfg.scheduler, cfg.optimizer)
    device = resolve_device(cfg.train.device)
    model, parallel = build_model(cfg, device, mesh)
    rank0 = not parallel.distributed or dist.get_rank() == 0
    plan = plan_batches(cfg.train, parallel.dp_size, cfg.data)
    optimizer = build_optimizer(model, cfg.optimizer)
    train_model = torch.compile(model) if cfg.train.compile else model

    state: dict[str, Any] = {"step": 0, "tokens": 0, "skipped_steps": 0, "consecutive_nonfinite": 0}
    loader_state = LoaderState()
    resumed_from = finetuned_from = None
    ckpt_cfg = cfg.checkpoint
    source = None if ckpt_cfg.finetune else ckpt_cfg.load
    if source is None and ckpt_cfg.save and ckpt_cfg.auto_resume:
        found = resolve_checkpoint(ckpt_cfg.save, must_exist=False)
        source = str(found) if found is not None else None
    if source is None and ckpt_cfg.finetune and ckpt_cfg.load is not None:
        # weights only: optimizer, step and data position start fresh
        finetuned_from = str(load_checkpoint(ckpt_cfg.load, model, None, restore_rng=False).path)
    if source is not None:
        loaded = load_checkpoint(source, model, optimizer)
        resumed_from = str(loaded.path)
        saved = loaded.train_state
        loader_state = TrainingData.state_from(saved.pop("loader"))
        state.update({k: saved[k] for k in state if k in saved})

    data = TrainingData(cfg.data, cfg.train, plan, cfg.model.vocab_size, parallel.dp_rank,
                        loader_state, cp_rank=parallel.cp_rank, cp_size=parallel.cp_size,
                        sequence_multiple=parallel.sequence_multiple,
                        pin_memory=device.type == "cuda")
    arch = cfg.model.arch()
    world = dist.get_world_size() if parallel.distributed else 1
    data_record = data_artifact_record(cfg.data.blend) if rank0 and not cfg.data.mock else None
    config_json = json.dumps(_config_dict(cfg), indent=2, default=str)

    metrics = MetricsLogger(job_dir, cfg.logger, enabled=rank0, on_event=on_event,
                            run_config=_config_dict(cfg))
    checkpointer = None
    if ckpt_cfg.save:
        checkpointer = Checkpointer(
            ckpt_cfg.save, ckpt_cfg.keep_last, ckpt_cfg.async_save,
            on_complete=lambda path, step: metrics.event("checkpoint", {"path": str(path), "step": step}),
        )

    def save() -> str | None:
        if checkpointer is None:
            return None
        train_state = dict(state, loader=data.state_dict())
        manifest = build_model_artifact(
            step=state["step"], tokens=state["tokens"], model_config=dataclasses.asdict(arch),
            data=data_record, phase=data.state.phase,
            extra={"config": CONFIG_FILE, "phase2_blend": cfg.data.phase2_blend},
        )
        files = {CONFIG_FILE: config_json, MODEL_ARTIFACT_FILE: manifest_json(manifest)}
        return str(checkpointer.save(state["step"], model, optimizer, train_state, files))

    moe_layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    rate = cfg.train.expert_bias_update_rate
    last: StepResult | None = None
    last_balance: balancing.BalanceStats | None = None
    valid_loss = test_loss = None
    status = "completed"
    last_checkpoint = resumed_from
    saved_step = state["step"] if resumed_from else None
    run_start, run_tokens = time.perf_counter(), 0
    entropy = unigram_entropy(cfg.data.blend) if rank0 and not cfg.data.mock else None
    metrics.event("start", {"total_steps": plan.total_steps, "step": state["step"],
                            "resumed_from": resumed_from, "finetuned_from": finetuned_from,
                            "grad_accumulation": plan.grad_accumulation,
                            "compute_weights": resolve_compute_weights(
                                cfg.train, device, world, _one_process_accumulation(cfg)),
                            "unigram_entropy": entropy,
                            "ignored_layout": None if world > 1 else ignored_layout(cfg)})
    if entropy is not None:
        metrics.log("run", state["step"], {"unigram_entropy": entropy})
    try:
        with StopRequest() as stop:
            while state["step"] < plan.total_steps:
                step_start = time.perf_counter()
                if data.maybe_switch_phase(state["step"]):
                    metrics.event("phase", {"step": state["step"], "phase": 2})
                lr = learning_rate(state["tokens"], plan.total_tokens, cfg.scheduler, cfg.optimizer)
                set_learning_rate(optimizer, lr)
                data_start = time.perf_counter()
                batches = data.next_train_batches()
                data_time = time.perf_counter() - data_start
                last = train_step(train_model, optimizer, batches, device=device,
                                  precision=cfg.train.precision, grad_clip=cfg.train.grad_clip,
                                  parallel=parallel,
                                  fsdp_accumulate_unsharded=cfg.train.fsdp_accumulate_unsharded)
                if last.finite:
                    last_balance = balancing.update_expert_biases(
                        moe_layers, rate, group=parallel.balancing_group)
                    state["consecutive_nonfinite"] = 0
                else:
                    balancing.reset_expert_counts(moe_layers)
                    state["skipped_steps"] += 1
                    state["consecutive_nonfinite"] += 1
                state["step"] += 1
                state["tokens"] += data.last_step_tokens  # mixed lengths: fewer than planned
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - step_start
                run_tokens += data.last_step_tokens
                tps = data.last_step_tokens / elapsed
                step_flops = flops.training_flops(arch, data.last_step_lengths)
                values = {
                    "loss": last.loss, "lm_loss": last.lm_loss, "lr": lr,
                    "grad_norm": last.grad_norm, "tokens": state["tokens"],
                    "phase": data.state.phase, "step_time": elapsed, "data_time": data_time,
                    "tokens_per_second": tps,
                    "tflops": step_flops / elapsed / 1e12 / world,
                    "mfu": step_flops / elapsed / (flops.H200_BF16_PEAK_FLOPS * world),
                    "memory_gb": _memory_gb(device), "skipped": not last.finite,
                    "skipped_steps": state["skipped_steps"],
                }
                if last.finite and last_balance is not None:
                    values.update(last_balance.summary())
                    values["balance/per_layer_max_over_mean"] = last_balance.max_over_mean
                if state["step"] % cfg.train.log_interval == 0 or state["step"] == plan.total_steps:
                    metrics.log("train", state["step"], values)
                if state["consecutive_nonfinite"] > cfg.train.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"{state['consecutive_nonfinite']} consecutive steps (up to step "
                        f"{state['step']}) had a non-finite loss or gradient norm (loss "
                        f"{last.loss}, grad norm {last.grad_norm}); stopping. Updates of those "
                        f"steps were skipped; the last good checkpoint is {last_checkpoint}"
                    )
                if checkpointer is not None:
                    checkpointer.poll()
                if cfg.train.eval_iters and state["step"] % cfg.train.eval_interval == 0:
                    valid_loss = _run_eval(data.next_valid_batches(), model, device, cfg, parallel,
                                           metrics, "eval", state["step"], valid_loss)
                stopping = stop.requested(parallel)
                if state["step"] % ckpt_cfg.save_interval == 0 or stopping or (
                        state["step"] == plan.total_steps):
                    if saved_step != state["step"]:
                        last_checkpoint = save() or last_checkpoint
                        saved_step = state["step"]
                if stopping:
                    status = "interrupted"
                    metrics.event("stop", {"step": state["step"], "signal": stop.signum})
                    break
            if status == "completed" and cfg.train.eval_iters:
                test_loss = _run_eval(data.test_batches(), model, device, cfg, parallel,
                                      metrics, "test", state["step"], None)
    finally:
        data.close()
        if checkpointer is not None:
            checkpointer.wait()
        metrics.close()

    wall = time.perf_counter() - run_start
    summary = TrainSummary(
        steps=state["step"], tokens=state["tokens"],
        final_loss=last.lm_loss if last is not None else None,
        checkpoint=last_checkpoint, status=status, valid_loss=valid_loss, test_loss=test_loss,
        skipped_steps=state["skipped_steps"],
        balance_max_over_mean=last_balance.worst_max_over_mean if last_balance else None,
        balance_bias_range=last_balance.bias_range if last_balance else None,
        unigram_entropy=entropy,
        tokens_per_second=run_tokens / wall if run_tokens and wall > 0 else None,
        resumed_from=resumed_from, finetuned_from=finetuned_from,
    )
    metrics.event("end", dataclasses.asdict(summary))
    return summary


def _run_eval(batches, model, device, cfg, parallel, metrics, kind, step, previous):
    if batches is None:
        return previous
    loss = evaluate(model, batches, device=device, precision=cfg.train.precision, parallel=parallel)
    metrics.log(kind, step, {"loss": loss, "ppl": math.exp(min(loss, 50.0))})
    return loss
