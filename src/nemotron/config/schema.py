"""Typed composition of the recipe sections; each section's dataclass is owned by its package.

`PretrainConfig` is what `nemotron nano3 pretrain` reads (recipe `config/<name>.yaml`),
`DataPrepJobConfig` what `nemotron nano3 data prep pretrain` reads (`config/data_prep/<name>.yaml`).
Beyond the per-field types, `validate_pretrain` / `validate_data_prep` check the values that no
single section can judge alone; they raise `ConfigError` naming the full dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nemotron.artifacts.wandb_lineage import WANDB_MODES
from nemotron.config.errors import ConfigError
from nemotron.data.config import DataConfig, DataPrepConfig
from nemotron.data.tokenizers import KINDS as TOKENIZER_KINDS
from nemotron.distributed.config import ParallelismConfig
from nemotron.distributed.parallel_dims import check_global_batch
from nemotron.models.nano3.config import ModelConfigError, Nano3Config
from nemotron.train.config import (
    COMPUTE_WEIGHTS,
    CheckpointConfig,
    LoggerConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
)
from nemotron.train.fp8_config import check_fp8_config, experts_float32_grads_problem
from nemotron.train.schedule import DECAY_STYLES, ON_RESUME
from nemotron.train.schedule import STYLES as SCHEDULE_STYLES


@dataclass
class ModelConfig(ParallelismConfig, Nano3Config):
    """The flat `model` section: architecture and parallel sizes side by side (Megatron style).

    It is a `Nano3Config` (so it can be passed where one is expected); `arch()` and `parallel()`
    return the two plain section objects.
    """

    def arch(self) -> Nano3Config:
        return Nano3Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Nano3Config)})

    def parallel(self) -> ParallelismConfig:
        return ParallelismConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(ParallelismConfig)}
        )


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    data: DataConfig = field(default_factory=DataConfig)


# The data-prep recipe is the data package's DataPrepConfig itself (no extra sections).
DataPrepJobConfig = DataPrepConfig

# Where `-c NAME` looks for each schema, relative to the package's stage-0 recipe config dir.
RECIPE_SUBDIRS: dict[type, str] = {PretrainConfig: "", DataPrepConfig: "data_prep"}

# Enumerated string fields, checked at load time so that the error names the key. Where the
# owning package defines the allowed values, they are taken from it (one source of truth).
CHOICES: dict[str, tuple[str, ...]] = {
    "train.precision": ("bf16", "fp32"),  # documented in train/config.py
    "train.device": ("auto", "cpu", "cuda"),
    "train.compute_weights": COMPUTE_WEIGHTS,
    "scheduler.style": SCHEDULE_STYLES,
    "scheduler.decay_style": DECAY_STYLES,
    "scheduler.on_resume": ON_RESUME,
    "logger.wandb_mode": WANDB_MODES,
    "wandb_mode": WANDB_MODES,  # data prep's
    "tokenizer.kind": TOKENIZER_KINDS,
}


def _get(cfg: object, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_choices(cfg: object) -> None:
    """Enumerated fields (CHOICES); keys of other schemas are skipped."""
    for key, allowed in CHOICES.items():
        try:
            value = _get(cfg, key)
        except AttributeError:
            continue
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


# Path keys and what null means for each ('' where it must be set). An empty (or blank) string is no path: it resolves to
# the working directory, which would then be saved into (checkpoints, a prep's shards,
# blend.json and metadata.json beside whatever is there) or read as a missing file.
PATH_KEYS: dict[str, str] = {
    "checkpoint.save": "<job dir>/checkpoints",
    "checkpoint.load": "no checkpoint to load",
    "data.blend": "",
    "data.phase2_blend": "no phase 2",
    "data.cache_dir": "<blend dir>/cache",
    "output_dir": "",  # data prep's
    "blend_path": "",  # data prep's
}


def _check_paths(cfg: object) -> None:
    """Path keys (PATH_KEYS) that are set name a path; keys of other schemas are skipped."""
    for key, null_means in PATH_KEYS.items():
        try:
            value = _get(cfg, key)
        except AttributeError:
            continue
        if isinstance(value, str) and not value.strip():
            hint = f", or null for {null_means}" if null_means else ""
            raise ConfigError(f"{key}: is an empty path (the working directory); give a path{hint}")


def _check_finite(cfg: Any, prefix: str = "") -> None:
    """Every float of the config is a number: an `.inf` or `.nan` (YAML) learning rate, clip or
    fraction would otherwise pass the range checks below (inf > 0) and train to NaN weights."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_finite(item, f"{key}[{i}].")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")


def _qualify_model_error(message: str) -> str:
    """Prefix the Nano3Config field names in a ModelConfigError message with `model.`."""
    names = sorted((f.name for f in dataclasses.fields(Nano3Config)), key=len, reverse=True)
    # not after a word character or `model.` (already qualified); `1..num_experts` is a name
    pattern = re.compile(r"(?<!\w)(?<!model\.)(" + "|".join(map(re.escape, names)) + r")\b")
    return pattern.sub(lambda m: "model." + m.group(1), message)


def model_error(exc: ModelConfigError) -> ConfigError:
    return ConfigError(_qualify_model_error(str(exc)))


def _check_pipeline(parallel: ParallelismConfig, arch) -> None:
    """The pipeline keys: a known schedule, stages per rank that fit it, a manual split that
    covers the blocks (the one home of these rules is `distributed.pipeline_split`)."""
    from nemotron.distributed.pipeline_split import PipelineSplitError, split_stages

    if parallel.pipeline_model_parallel_size < 1:
        return
    try:
        split_stages(arch, parallel, [(8192, 1.0)])
    except PipelineSplitError as err:
        raise ConfigError(str(err)) from None


def validate_pretrain(cfg: PretrainConfig) -> None:
    """Cross-field checks of a pretraining recipe; raises ConfigError naming the dotted key."""
    _check_finite(cfg)
    try:
        cfg.model.validate()
    except ModelConfigError as exc:
        raise model_error(exc) from None
    for f in dataclasses.fields(ParallelismConfig):
        value = getattr(cfg.model, f.name)
        if isinstance(value, int) and not isinstance(value, bool):
            _require(value >= 1, f"model.{f.name}", f"must be >= 1, got {value}")
    _check_pipeline(cfg.model.parallel(), cfg.model)

    t = cfg.train
    if (t.train_iters is None) == (t.train_tokens is None):
        raise ConfigError(
            "train.train_iters / train.train_tokens: set exactly one of them "
            f"(got train_iters={t.train_iters}, train_tokens={t.train_tokens})"
            # Both set is what `train.train_iters=N` on a token-length recipe gives: say how.
            + ("; both are set: unset one, e.g. train.train_tokens=null" if t.train_iters is not None else "")
        )
    for key in (
        "train_iters",
        "train_tokens",
        "global_batch_size",
        "micro_batch_size",
        "seq_length",
        "eval_interval",
        "log_interval",
        "max_consecutive_nonfinite",
    ):
        value = getattr(t, key)
        if value is not None:
            _require(value > 0, f"train.{key}", f"must be positive, got {value}")
    # numpy's RandomState(train.seed) orders the documents and samples (Megatron's semantics)
    _require(0 <= t.seed < 2**32, "train.seed", f"must be in [0, 2**32), got {t.seed}")
    _require(t.max_skipped_steps >= 0, "train.max_skipped_steps", f"must be >= 0, got {t.max_skipped_steps}")
    _require(t.eval_iters >= 0, "train.eval_iters", f"must be >= 0, got {t.eval_iters}")
    _require(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 = off), got {t.grad_clip}")
    # the batch rule of nemotron.distributed.parallel_dims with what is known before the world
    # size (one data-parallel rank); sequence lengths are checked once the layout applies (a
    # single process ignores the configured TP / CP)
    check_global_batch(t.global_batch_size, t.micro_batch_size, error=ConfigError)
    _require(
        t.expert_bias_update_rate >= 0,
        "train.expert_bias_update_rate",
        f"must be >= 0, got {t.expert_bias_update_rate}",
    )
    _require(
        t.compute_weights != "bf16" or t.precision == "bf16",
        "train.compute_weights",
        "bf16 needs train.precision=bf16 (bf16 compute weights run under bf16 autocast)",
    )
    for key, message in check_fp8_config(t.fp8, t.precision, cfg.model.tensor_model_parallel_size):
        raise ConfigError(f"{key}: {message}")
    grads_problem = experts_float32_grads_problem(t.experts_float32_grads, t.fp8)
    _require(grads_problem is None, "train.experts_float32_grads", str(grads_problem))

    o = cfg.optimizer
    _require(o.lr > 0, "optimizer.lr", f"must be positive, got {o.lr}")
    _require(o.min_lr >= 0, "optimizer.min_lr", f"must be >= 0, got {o.min_lr}")
    _require(o.min_lr <= o.lr, "optimizer.min_lr", f"({o.min_lr}) must not exceed optimizer.lr ({o.lr})")
    for key in ("beta1", "beta2"):
        value = getattr(o, key)
        _require(0 <= value < 1, f"optimizer.{key}", f"must be in [0, 1), got {value}")
    _require(o.eps > 0, "optimizer.eps", f"must be positive, got {o.eps}")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")

    s = cfg.scheduler
    _require(s.warmup_tokens >= 0, "scheduler.warmup_tokens", f"must be >= 0, got {s.warmup_tokens}")
    _require(
        0 <= s.stable_fraction_end <= 1,
        "scheduler.stable_fraction_end",
        f"must be in [0, 1], got {s.stable_fraction_end}",
    )

    c = cfg.checkpoint
    _require(c.save_interval > 0, "checkpoint.save_interval", f"must be positive, got {c.save_interval}")
    if c.keep_last is not None:
        _require(c.keep_last > 0, "checkpoint.keep_last", f"must be positive or null, got {c.keep_last}")

    d = cfg.data
    _require(
        0 < d.phase2_start_fraction <= 1,
        "data.phase2_start_fraction",
        f"must be in (0, 1], got {d.phase2_start_fraction}",
    )
    _require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _require(
        d.mock or d.blend is not None,
        "data.blend",
        "is null: point it at the blend.json written by data prep (or set data.mock=true)",
    )
    _require(d.blend_weight >= 0, "data.blend_weight", f"must be >= 0, got {d.blend_weight}")
    if d.split is not None:
        # The data package reads split strings (one rule, one home); torch comes with it, so
        # only for a config that sets one.
        from nemotron.data.gpt_dataset import GPTDatasetError, split_bounds

        try:
            bounds = split_bounds(d.split)
        except GPTDatasetError as exc:
            raise ConfigError(f"data.split: {exc}") from None
        _require(bounds[0] is not None, "data.split", f"{d.split!r} gives the train split no share")
    for i, m in enumerate(d.mixed_length_blends):
        key = f"data.mixed_length_blends[{i}]"
        _require(d.mock or bool(m.blend), f"{key}.blend", "must name a blend.json")
        _require(m.seq_length > 0, f"{key}.seq_length", f"must be positive, got {m.seq_length}")
        _require(m.weight >= 0, f"{key}.weight", f"must be >= 0, got {m.weight}")
    _check_paths(cfg)
    if d.mixed_length_blends:
        _require(
            d.blend_weight + sum(m.weight for m in d.mixed_length_blends) > 0,
            "data.blend_weight",
            "and the data.mixed_length_blends weights sum to 0",
        )
    _check_choices(cfg)


def validate_data_prep(cfg: DataPrepConfig) -> None:
    """Value checks of a data-prep recipe; raises ConfigError naming the dotted key."""
    _check_finite(cfg)
    for key in ("num_shards", "valid_shards", "test_shards"):
        value = getattr(cfg, key)
        _require(value >= 1, key, f"must be >= 1, got {value}")
    for key in ("valid_fraction", "test_fraction", "max_bad_record_fraction"):
        value = getattr(cfg, key)
        _require(0 <= value < 1, key, f"must be in [0, 1), got {value}")
    _require(
        cfg.valid_fraction + cfg.test_fraction < 1,
        "valid_fraction",
        "valid_fraction + test_fraction must be < 1",
    )
    for key in ("min_doc_chars", "max_doc_tokens", "sample", "num_workers"):
        value = getattr(cfg, key)
        if value is not None:
            _require(value > 0, key, f"must be positive or null, got {value}")
    # MiB of text per work unit: it becomes a byte count (an int) when the prep plans its units
    _require(cfg.work_unit_mb > 0, "work_unit_mb", f"must be positive, got {cfg.work_unit_mb}")
    _check_paths(cfg)
    _require(bool(cfg.tokenizer.model), "tokenizer.model", "must not be empty")
    _check_choices(cfg)


VALIDATORS: dict[type, Callable[[Any], None]] = {
    PretrainConfig: validate_pretrain,
    DataPrepConfig: validate_data_prep,
}
