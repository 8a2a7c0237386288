"""Learning-rate schedule: warmup-stable-decay (WSD) in tokens, or constant.

The learning rate is a pure function of the tokens consumed before the step (by the steps whose
update was applied: the trainer's `RunState.schedule_tokens`, as Megatron's scheduler steps only
after a successful update) and of the run's length in tokens. A checkpoint records the schedule
it was trained with (`LRSchedule.as_dict`), so that a resumed run whose config would give
different rates (e.g. a longer `train.train_iters` moves the decay) is noticed:
`scheduler.on_resume` decides what happens (`resume_schedule`), with Megatron's three choices.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Any, Iterable

from nemotron.train.config import OptimizerConfig, SchedulerConfig

DECAY_STYLES = ("cosine", "linear", "1-sqrt")
STYLES = ("wsd", "constant")
# scheduler.on_resume: what a resumed run does when the checkpoint's schedule and the config's
# give a different rate to a step still to run. strict: refuse (Megatron's default, which
# asserts that the scheduler's values match the checkpoint's); checkpoint: keep the
# checkpoint's (--use-checkpoint-opt_param-scheduler); config: take the config's
# (--override-opt_param-scheduler).
ON_RESUME = ("strict", "checkpoint", "config")


class ScheduleConfigError(ValueError):
    """A scheduler section that cannot describe a schedule."""


def validate_schedule(sched: SchedulerConfig, opt: OptimizerConfig) -> None:
    if sched.style not in STYLES:
        raise ScheduleConfigError(f"scheduler.style {sched.style!r} is not one of {STYLES}")
    if sched.decay_style not in DECAY_STYLES:
        raise ScheduleConfigError(f"scheduler.decay_style {sched.decay_style!r} is not one of {DECAY_STYLES}")
    if sched.on_resume not in ON_RESUME:
        raise ScheduleConfigError(f"scheduler.on_resume {sched.on_resume!r} is not one of {ON_RESUME}")
    if sched.warmup_tokens < 0:
        raise ScheduleConfigError(f"scheduler.warmup_tokens must be >= 0, got {sched.warmup_tokens}")
    if not 0.0 <= sched.stable_fraction_end <= 1.0:
        raise ScheduleConfigError(
            f"scheduler.stable_fraction_end must be in [0, 1], got {sched.stable_fraction_end}"
        )
    for key, value in (
        ("optimizer.lr", opt.lr),
        ("optimizer.min_lr", opt.min_lr),
        ("scheduler.stable_fraction_end", sched.stable_fraction_end),
    ):
        if not math.isfinite(value):
            raise ScheduleConfigError(f"{key} must be a finite number, got {value}")
    if opt.lr < 0 or opt.min_lr < 0 or opt.min_lr > opt.lr:
        raise ScheduleConfigError(f"need 0 <= optimizer.min_lr ({opt.min_lr}) <= optimizer.lr ({opt.lr})")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past float's range
        return False


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


def learning_rate(tokens: int, total_tokens: int, sched: SchedulerConfig, opt: OptimizerConfig) -> float:
    """LR for a step that starts after `tokens` tokens of a `total_tokens`-token run.

    WSD: linear warmup 0 -> lr over warmup_tokens; lr until stable_fraction_end * total_tokens;
    then decay to min_lr by the end of training (min_lr afterwards). Constant: lr throughout.
    The comparisons are Megatron's (`OptimizerParamScheduler.get_lr`, in samples where these
    are tokens): the warmup line holds up to and including its last token, even where the
    decay has already begun (so a warmup reaching past the decay's start ends at lr, and the
    next step joins the decay curve); the stable phase holds up to and including the decay's
    start; past the end of the run, min_lr.
    """
    if sched.style == "constant":
        return opt.lr
    if sched.style != "wsd":
        raise ScheduleConfigError(f"scheduler.style {sched.style!r} is not one of {STYLES}")
    if sched.warmup_tokens > 0 and tokens <= sched.warmup_tokens:
        return opt.lr * tokens / sched.warmup_tokens
    if tokens > total_tokens:
        return opt.min_lr
    decay_start = sched.stable_fraction_end * total_tokens
    if tokens <= decay_start:
        return opt.lr
    progress = (tokens - decay_start) / (total_tokens - decay_start)
    return opt.min_lr + (opt.lr - opt.min_lr) * decay_factor(progress, sched.decay_style)


def warmup_warning(schedule: "LRSchedule") -> str | None:
    """A WSD schedule whose warmup lasts the whole run (e.g. a short trial of the recipe with
    its 8.4B warmup tokens left in place): the rate never reaches optimizer.lr and never
    decays. Megatron refuses it (it asserts warmup < decay samples); a short trial run is
    legitimate, so this only says so."""
    if schedule.style != "wsd" or schedule.warmup_tokens < schedule.total_tokens:
        return None
    peak = schedule.rate(schedule.total_tokens)
    return (
        f"scheduler.warmup_tokens ({schedule.warmup_tokens:,}) is not below the run's "
        f"{schedule.total_tokens:,} tokens: the learning rate is still warming up when the run "
        f"ends ({peak:.4g} there, of optimizer.lr {schedule.lr:.4g}) and never decays "
        f"(Megatron refuses such a schedule)"
    )


class ScheduleChangeError(ValueError):
    """A resumed run whose config changes the learning rate of steps still to run, under
    `scheduler.on_resume=strict`."""


@dataclass(frozen=True)
class LRSchedule:
    """Everything the learning rate of a step depends on besides the tokens consumed."""

    style: str
    lr: float
    min_lr: float
    warmup_tokens: int
    stable_fraction_end: float
    decay_style: str
    total_tokens: int

    @classmethod
    def from_config(cls, sched: SchedulerConfig, opt: OptimizerConfig, total_tokens: int) -> "LRSchedule":
        return cls(
            sched.style,
            opt.lr,
            opt.min_lr,
            sched.warmup_tokens,
            sched.stable_fraction_end,
            sched.decay_style,
            int(total_tokens),
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "LRSchedule":
        """The schedule a checkpoint saved (`as_dict`); ValueError naming the first key that is
        missing or holds no such value (checked as a config's schedule is, `validate_schedule`)."""
        if not isinstance(values, dict):
            raise ScheduleConfigError(f"schedule must be a JSON object, got {json.dumps(values)}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values]
        if missing:
            raise ScheduleConfigError(f"schedule has no {', '.join(missing)}")
        for key in ("style", "decay_style"):
            if not isinstance(values[key], str):
                raise ScheduleConfigError(f"schedule.{key} must be a string, got {json.dumps(values[key])}")
        for key in ("lr", "min_lr", "stable_fraction_end"):
            if type(values[key]) not in (int, float) or not _finite(values[key]):
                raise ScheduleConfigError(
                    f"schedule.{key} must be a finite number, got {json.dumps(values[key])}"
                )
        # Here, not at the top: the checkpoint module imports torch, which config loading
        # (it validates schedules through this module) must not (tests/config/test_imports.py).
        from nemotron.train.checkpoint import saved_count

        for key in ("warmup_tokens", "total_tokens"):
            saved_count(values, key, "schedule.")
        schedule = cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})
        try:
            validate_schedule(*schedule._configs)
        except ScheduleConfigError as e:  # its messages name the config's keys: say whose
            raise ScheduleConfigError(f"schedule: {e} (as saved)") from None
        return schedule

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @functools.cached_property
    def _configs(self) -> tuple[SchedulerConfig, OptimizerConfig]:
        return (
            SchedulerConfig(
                style=self.style,
                warmup_tokens=self.warmup_tokens,
                stable_fraction_end=self.stable_fraction_end,
                decay_style=self.decay_style,
            ),
            OptimizerConfig(lr=self.lr, min_lr=self.min_lr),
        )

    def rate(self, tokens: int) -> float:
        """The learning rate of a step that starts after `tokens` tokens."""
        sched, opt = self._configs
        return learning_rate(tokens, self.total_tokens, sched, opt)

    def first_difference(self, other: "LRSchedule", token_points: Iterable[int]) -> int | None:
        """The first of `token_points` at which the two schedules give different rates."""
        if self == other:
            return None
        for tokens in token_points:
            if self.rate(tokens) != other.rate(tokens):
                return tokens
        return None


def resume_schedule(
    saved: LRSchedule, config: LRSchedule, policy: str, tokens: int, tokens_per_step: int, where: str
) -> tuple[LRSchedule, str | None]:
    """The schedule a run resumed after `tokens` tokens continues with, and the announcement of
    a change (None when the two give the same rate to every step still to run, at the planned
    `tokens_per_step`). `where` names the checkpoint in messages."""
    remaining = range(tokens, max(tokens, config.total_tokens), max(1, tokens_per_step))
    at = saved.first_difference(config, remaining)
    if at is None:
        return config, None
    changed = ", ".join(
        f"{key} {a} -> {b}"
        for key, a, b in (
            (f.name, getattr(saved, f.name), getattr(config, f.name)) for f in dataclasses.fields(LRSchedule)
        )
        if a != b
    )
    change = (
        f"the learning-rate schedule differs from the one {where} was trained with "
        f"({changed}): after {at:,} tokens the rate would be {config.rate(at):.4g} "
        f"instead of {saved.rate(at):.4g}"
    )
    if policy == "strict":
        raise ScheduleChangeError(
            f"{change}; set scheduler.on_resume=checkpoint to keep the checkpoint's schedule or "
            f"scheduler.on_resume=config to take this config's (Megatron's "
            f"--use-checkpoint-opt_param-scheduler / --override-opt_param-scheduler)"
        )
    if policy == "checkpoint":
        return saved, f"{change}; keeping the checkpoint's schedule (scheduler.on_resume=checkpoint)"
    if policy == "config":
        return config, f"{change}; taking this config's schedule (scheduler.on_resume=config)"
    raise ScheduleConfigError(f"scheduler.on_resume {policy!r} is not one of {ON_RESUME}")
