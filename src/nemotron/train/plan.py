"""How a run is cut into steps and micro-batches: a pure function of the train and data
configs, free of torch so that dry runs and launch plans can show it at once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from nemotron.data.config import DataConfig
from nemotron.distributed.parallel_dims import check_global_batch
from nemotron.train.config import TrainConfig


class TrainDataError(ValueError):
    """Batch sizes or data settings that cannot form a training run."""


@dataclass(frozen=True)
class BatchPlan:
    global_batch_size: int
    micro_batch_size: int
    dp_size: int
    seq_length: int
    total_steps: int
    # Mean sample length (tokens) when samples of several lengths are mixed; None: seq_length.
    mean_sample_length: float | None = None

    @property
    def grad_accumulation(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of a step (on average, with mixed sequence lengths)."""
        if self.mean_sample_length is None:
            return self.global_batch_size * self.seq_length
        return round(self.global_batch_size * self.mean_sample_length)

    @property
    def total_tokens(self) -> int:
        return self.total_steps * self.tokens_per_step


def mean_sample_length(data: DataConfig | None, seq_length: int) -> float | None:
    """Mean training-sample length under `data.mixed_length_blends` (the blending rule keeps
    the per-sample weights exactly, up to rounding), None without them."""
    if data is None or not data.mixed_length_blends:
        return None
    pairs = [(data.blend_weight, seq_length)] + [(m.weight, m.seq_length) for m in data.mixed_length_blends]
    total = sum(w for w, _ in pairs)
    if total <= 0:
        raise TrainDataError("data.blend_weight and data.mixed_length_blends weights sum to 0")
    return sum(w * n for w, n in pairs) / total


def plan_batches(train: TrainConfig, dp_size: int = 1, data: DataConfig | None = None) -> BatchPlan:
    """Derive gradient accumulation and the number of steps (from iters or tokens; with mixed
    sequence lengths in `data`, tokens count at the mean sample length)."""
    check_global_batch(train.global_batch_size, train.micro_batch_size, dp_size, TrainDataError)
    if (train.train_iters is None) == (train.train_tokens is None):
        raise TrainDataError("set exactly one of train.train_iters and train.train_tokens")
    mean = mean_sample_length(data, train.seq_length)
    tokens_per_step = train.global_batch_size * (train.seq_length if mean is None else mean)
    if train.train_iters is not None:
        steps = train.train_iters
    else:
        assert train.train_tokens is not None  # exactly one is set (checked above)
        steps = math.ceil(train.train_tokens / tokens_per_step)
    if steps <= 0:
        raise TrainDataError(f"the run has {steps} steps; train_iters/train_tokens too small")
    return BatchPlan(train.global_batch_size, train.micro_batch_size, dp_size, train.seq_length, steps, mean)


def phase2_start_step(plan: BatchPlan, data: DataConfig) -> int | None:
    """First step trained on the phase-2 blend: the first whose starting token count reaches
    phase2_start_fraction of the run's tokens (None without a phase-2 blend)."""
    if not data.phase2_blend:
        return None
    return min(plan.total_steps, math.ceil(data.phase2_start_fraction * plan.total_steps - 1e-9))


def evaluation_warnings(data: DataConfig, train: TrainConfig) -> list[str]:
    """What a run with evaluation on (`train.eval_iters` > 0) will not evaluate because its
    blend has no such split (`split_has_share`: a split string giving it no share, or a
    per-split file's empty entry): no valid split, no periodic or final validation; no test
    split, no test pass. Megatron-LM refuses nothing up front (a split without share builds no
    dataset; its loader is None); here the run start and the dry run say so, naming the keys:
    a warning, since `eval_iters` 0 is how a run says it evaluates nothing. Evaluation is
    always of the phase-1 blend (`eval_dataset`)."""
    blend = data.blend
    if data.mock or not train.eval_iters or blend is None or not Path(blend).is_file():
        return []
    # Here, not at the top: the module stays free of torch for dry runs without a blend.
    from nemotron.data.gpt_dataset import (
        DEFAULT_SPLIT,
        GPTDatasetError,
        is_single_blend,
        load_blend,
        split_has_share,
    )

    try:
        single = is_single_blend(load_blend(blend))
    except GPTDatasetError:
        return []  # an unreadable blend: the run's build says what is wrong
    split = (DEFAULT_SPLIT if data.split is None else data.split) if single else None
    warnings = []
    for name, skipped in (
        (
            "valid",
            f"no validation runs, neither every train.eval_interval={train.eval_interval} steps "
            "nor after the last step",
        ),
        ("test", "the test pass after the last step is skipped"),
    ):
        if split_has_share(blend, name, data.split):
            continue
        why = (
            f"data.split {split!r} gives data.blend {blend} no {name} share"
            if single
            else f'data.blend {blend} has an empty "{name}" split'
        )
        warnings.append(
            f"{why}: with train.eval_iters={train.eval_iters}, {skipped}. Set "
            f"train.eval_iters=0 to train without evaluation, or give the {name} split data"
        )
    return warnings
