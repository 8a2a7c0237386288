"""Learning-rate schedule: warmup-stable-decay (WSD) in tokens, or constant.

The learning rate is a pure function of the tokens consumed before the step, so a resumed run
gets exactly the same rates (nothing about the schedule needs saving but the token count).
"""

from __future__ import annotations

import math

from nemotron.train.config import OptimizerConfig, SchedulerConfig

DECAY_STYLES = ("cosine", "linear", "1-sqrt")
STYLES = ("wsd", "constant")


class ScheduleConfigError(ValueError):
    """A scheduler section that cannot describe a schedule."""


def validate_schedule(sched: SchedulerConfig, opt: OptimizerConfig) -> None:
    if sched.style not in STYLES:
        raise ScheduleConfigError(f"scheduler.style {sched.style!r} is not one of {STYLES}")
    if sched.decay_style not in DECAY_STYLES:
        raise ScheduleConfigError(
            f"scheduler.decay_style {sched.decay_style!r} is not one of {DECAY_STYLES}"
        )
    if sched.warmup_tokens < 0:
        raise ScheduleConfigError(f"scheduler.warmup_tokens must be >= 0, got {sched.warmup_tokens}")
    if not 0.0 <= sched.stable_fraction_end <= 1.0:
        raise ScheduleConfigError(
            f"scheduler.stable_fraction_end must be in [0, 1], got {sched.stable_fraction_end}"
        )
    if opt.lr < 0 or opt.min_lr < 0 or opt.min_lr > opt.lr:
        raise ScheduleConfigError(
            f"need 0 <= optimizer.min_lr ({opt.min_lr}) <= optimizer.lr ({opt.lr})"
        )


def decay_factor(progress: float, style: str) -> float:
    """1 at the start of the decay (progress 0), 0 at its end (progress 1)."""
    progress = min(max(progress, 0.0), 1.0)
    if style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if style == "linear":
        return 1.0 - progress
    if style == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    raise ScheduleConfigError(f"unknown decay style {style!r}; expected one of {DECAY_STYLES}")


def learning_rate(
    tokens: int, total_tokens: int, sched: SchedulerConfig, opt: OptimizerConfig
) -> float:
    """LR for a step that starts after `tokens` tokens of a `total_tokens`-token run.

    WSD: linear warmup 0 -> lr over warmup_tokens; lr until stable_fraction_end * total_tokens;
    then decay to min_lr by the end of training (min_lr afterwards). Constant: lr throughout.
    """
    if sched.style == "constant":
        return opt.lr
    if sched.style != "wsd":
        raise ScheduleConfigError(f"scheduler.style {sched.style!r} is not one of {STYLES}")
    if tokens < sched.warmup_tokens:
        return opt.lr * tokens / sched.warmup_tokens
    decay_start = sched.stable_fraction_end * total_tokens
    if tokens < decay_start:
        return opt.lr
    decay_tokens = total_tokens - decay_start
    if decay_tokens <= 0:
        return opt.min_lr
    progress = (tokens - decay_start) / decay_tokens
    return opt.min_lr + (opt.lr - opt.min_lr) * decay_factor(progress, sched.decay_style)
