import math

import pytest

from nemotron.train.config import OptimizerConfig, SchedulerConfig
from nemotron.train.schedule import ScheduleConfigError, learning_rate, validate_schedule

OPT = OptimizerConfig(lr=1e-3, min_lr=1e-5)
TOTAL = 25_000_000_000_000
WARMUP = 8_400_000_000


def lr(tokens, **sched):
    return learning_rate(tokens, TOTAL, SchedulerConfig(**sched), OPT)


def test_recipe_defaults_are_the_published_wsd():
    s = SchedulerConfig()
    assert (s.style, s.warmup_tokens, s.stable_fraction_end, s.decay_style) == ("wsd", WARMUP, 0.8, "cosine")


def test_warmup_is_linear_in_tokens_from_zero():
    assert lr(0) == 0.0
    assert lr(WARMUP // 4) == pytest.approx(0.25e-3)
    assert lr(WARMUP // 2) == pytest.approx(0.5e-3)
    assert lr(WARMUP - 1) == pytest.approx(1e-3, rel=1e-9) and lr(WARMUP - 1) < 1e-3
    assert lr(WARMUP) == 1e-3


def test_stable_until_80_percent_then_decays_to_min():
    decay_start = int(0.8 * TOTAL)
    assert lr(WARMUP + 1) == 1e-3
    assert lr(decay_start - 1) == 1e-3
    assert lr(decay_start) == 1e-3  # decay factor 1 at its first token
    assert lr(decay_start + 10**9) < 1e-3
    assert lr(decay_start + 1, decay_style="linear") < 1e-3
    assert lr(TOTAL) == pytest.approx(1e-5)
    assert lr(TOTAL + 10**12) == pytest.approx(1e-5)  # never below min after the end


@pytest.mark.parametrize(
    "style,factor_at_quarter",
    [("cosine", 0.5 * (1 + math.cos(math.pi * 0.25))), ("linear", 0.75), ("1-sqrt", 1 - math.sqrt(0.25))],
)
def test_decay_styles(style, factor_at_quarter):
    decay_start = 0.8 * TOTAL
    quarter = int(decay_start + 0.25 * (TOTAL - decay_start))
    expected = 1e-5 + (1e-3 - 1e-5) * factor_at_quarter
    assert lr(quarter, decay_style=style) == pytest.approx(expected, rel=1e-6)
    midpoint = int(decay_start + 0.5 * (TOTAL - decay_start))
    values = [lr(t, decay_style=style) for t in (int(decay_start), quarter, midpoint, TOTAL)]
    assert values == sorted(values, reverse=True)
    assert values[-1] == pytest.approx(1e-5)


def test_constant_mode_for_long_context_phase():
    opt = OptimizerConfig(lr=1e-5, min_lr=1e-5)
    for t in (0, 1, 10**9, 121 * 10**9):
        assert learning_rate(t, 121 * 10**9, SchedulerConfig(style="constant"), opt) == 1e-5


def test_zero_warmup_and_full_stable():
    assert lr(0, warmup_tokens=0) == 1e-3
    assert lr(TOTAL - 1, stable_fraction_end=1.0) == 1e-3


def test_bad_schedule_is_rejected():
    with pytest.raises(ScheduleConfigError, match="decay_style"):
        validate_schedule(SchedulerConfig(decay_style="cos"), OPT)
    with pytest.raises(ScheduleConfigError, match="style"):
        validate_schedule(SchedulerConfig(style="cosine"), OPT)
    with pytest.raises(ScheduleConfigError, match="min_lr"):
        validate_schedule(SchedulerConfig(), OptimizerConfig(lr=1e-5, min_lr=1e-3))


# A 10-step run of 100 tokens per step, lr 1 -> min 0.1, linear decay: the rate of every step,
# written out by hand from the rule (step k starts after 100k tokens; Megatron's WSD gives
# the same numbers, its scheduler counting the steps done before the step it sets).
@pytest.mark.parametrize(
    "case,warmup,stable_end,expected",
    [
        # warmup over 2 steps; decay over the last 20% (steps 8, 9): step 8 is the decay's first,
        # at factor 1; the last step is half-way down, min_lr would be the rate after the run
        ("recipe shape", 200, 0.8, [0.0, 0.5, 1, 1, 1, 1, 1, 1, 1, 0.55]),
        ("no warmup", 0, 0.8, [1, 1, 1, 1, 1, 1, 1, 1, 1, 0.55]),
        ("no decay", 200, 1.0, [0.0, 0.5, 1, 1, 1, 1, 1, 1, 1, 1]),
        # decay from the start: warmup first, up to and including its last token (step 2 at
        # lr, as Megatron's warmup test is num_steps <= warmup), then the decay curve where it
        # stands (0.3 in)
        ("all decay", 200, 0.0, [0.0, 0.5, 1.0, 0.73, 0.64, 0.55, 0.46, 0.37, 0.28, 0.19]),
        # a run shorter than its warmup never leaves it
        ("shorter than warmup", 2000, 0.8, [0.05 * k for k in range(10)]),
    ],
)
def test_every_step_of_a_short_run(case, warmup, stable_end, expected):
    sched = SchedulerConfig(warmup_tokens=warmup, stable_fraction_end=stable_end, decay_style="linear")
    opt = OptimizerConfig(lr=1.0, min_lr=0.1)
    rates = [learning_rate(100 * k, 1000, sched, opt) for k in range(10)]
    assert rates == pytest.approx(expected, abs=1e-12), case
    # after the run (a resumed longer run keeping this schedule): min_lr, as Megatron past its
    # decay steps; still the warmup line while the warmup lasts. At exactly the run's end a
    # schedule without decay is still in its stable phase (Megatron's `<= anneal start`).
    after = learning_rate(1000, 1000, sched, opt)
    assert after == pytest.approx(0.5 if warmup > 1000 else 1.0 if stable_end == 1.0 else 0.1), case
    past = learning_rate(1100, 1000, sched, opt)
    assert past == pytest.approx(0.55 if warmup > 1000 else 0.1), case
