"""Typed configs owned by the training package (sections `train`, `optimizer`, `scheduler`,
`checkpoint`, `logger` of a pretraining recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field

from nemotron.train.fp8_config import Fp8Config

# train.compute_weights: the weights the matmuls read (the master weights are fp32 either way).
#   fp32: fp32 weights cast by bf16 autocast inside every forward (one process: no FSDP);
#   bf16: bf16 copies made by FSDP2's mixed-precision policy, also in one process (a one-rank
#         mesh and process group), fp32 gradients and master weights; needs precision bf16;
#   auto: bf16 on CUDA with precision bf16 when distributed or accumulating over micro-batches,
#         fp32 otherwise (resolve_compute_weights in train/loop.py says why).
COMPUTE_WEIGHTS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    # Length of training: exactly one of train_iters / train_tokens (tokens is what the recipe states).
    train_iters: int | None = None
    train_tokens: int | None = None
    global_batch_size: int = 3072
    micro_batch_size: int = 1
    seq_length: int = 8192
    seed: int = 1234
    eval_interval: int = 1000
    eval_iters: int = 32
    log_interval: int = 1
    precision: str = "bf16"  # bf16 | fp32 (bf16 = autocast with fp32 master weights)
    device: str = "auto"  # auto | cpu | cuda
    grad_clip: float = 1.0
    # A step whose loss or gradient norm is not finite is skipped (no update); more than this
    # many in a row stop the run (NonFiniteLossError, naming the last good checkpoint).
    max_consecutive_nonfinite: int = 5
    # Skipped steps a run may have (in all, over resumes) and still end "completed"; with more
    # it ends "completed_with_skipped_steps" and the CLI exits non-zero.
    max_skipped_steps: int = 0
    # Balancing (docs/reference.md §2)
    expert_bias_update_rate: float = 1e-3
    # The chunked LM-head cross-entropy (`Nano3ForCausalLM(fused_loss=...)`: never holds the
    # float32 [tokens x vocab] logits). The Triton kernels are chosen per call by
    # `nemotron.kernels.use_triton` (off only under `nemotron.kernels.fast_paths(False)`);
    # torch.compile is `compile` below.
    fused_kernels: bool = True
    activation_recompute: bool = False
    compile: bool = False
    compute_weights: str = "auto"  # auto | fp32 | bf16 (COMPUTE_WEIGHTS above)
    # Gradient accumulation under FSDP2 (micro-batches before a step's last): keep the gathered
    # (bf16) weights and accumulate unsharded fp32 gradients, so weights are gathered once per
    # step and gradients reduce-scattered once; costs the unsharded weights and gradients in
    # memory for the whole step. Off: gather/reshard and reduce-scatter every micro-batch.
    fsdp_accumulate_unsharded: bool = True
    # Run each MoE layer's shared expert on a side CUDA stream beside the routed path's small
    # kernels and the expert-parallel all-to-all (models/nano3/moe.py
    # `set_shared_expert_overlap`); CUDA only.
    moe_shared_expert_overlap: bool = True
    # The routed experts' weight gradients written in float32, not rounded to BF16, in both
    # precisions: BF16 experts (FSDP2 gathers their weights in BF16 as before;
    # train/expert_grads.py) and FP8 experts whose FP8 forms FSDP2 gathers
    # (train.fp8.experts_fsdp_float8_all_gather; train/fp8_grouped.py). Only where FSDP2 gives
    # BF16 compute weights.
    experts_float32_grads: bool = False
    # FP8 GEMMs on Hopper for the chosen layers (train/fp8.py; off by default).
    fp8: Fp8Config = field(default_factory=Fp8Config)


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    min_lr: float = 1e-5
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1


@dataclass
class SchedulerConfig:
    style: str = "wsd"  # wsd | constant
    warmup_tokens: int = 8_400_000_000
    # WSD: the decay starts once this fraction of the total tokens is consumed.
    stable_fraction_end: float = 0.8
    decay_style: str = "cosine"  # cosine | linear | 1-sqrt
    # Resuming with a config whose schedule gives a different rate to a step still to run
    # (e.g. a longer train.train_iters moves the decay): strict = refuse, naming the change
    # (Megatron's default); checkpoint = keep the checkpoint's schedule; config = take this
    # config's (Megatron's --use-checkpoint-opt_param-scheduler / --override-opt_param-scheduler).
    on_resume: str = "strict"  # strict | checkpoint | config (train/schedule.py ON_RESUME)


@dataclass
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int = 1000
    keep_last: int | None = None
    async_save: bool = False
    # Resume automatically from the newest intact checkpoint `save` holds (damaged ones are
    # skipped with a warning naming them).
    auto_resume: bool = True
    # Each checkpoint's manifest.json holds every file's size and SHA-256, written at save
    # (every rank reads back its share) and checked before a resume. false: sizes only (for
    # checkpoints too large to read back at every save).
    verify_checksums: bool = True
    # Megatron's --finetune: take only the model weights (and expert biases) from `load`; the
    # optimizer, step, token count and data position start fresh (a new phase, e.g. long
    # context, from a pretraining checkpoint). A checkpoint of this run in `save` still resumes
    # it fully (auto_resume).
    finetune: bool = False


@dataclass
class LoggerConfig:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_mode: str = "offline"  # online | offline | disabled
    progress_bar: bool = True
