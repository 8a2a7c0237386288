"""Every shipped pretraining recipe, loaded as `nemotron nano3 pretrain -c NAME` loads it,
against the numbers of docs/reference.md §3 (the tech report's): batch, length, optimizer,
schedule, the phase switch, the long-context phase and the parallel layouts. The derived
quantities (steps, switch step, warmup steps, mean sample length) are computed here by hand."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from nemotron.config import PretrainConfig, load_config, resolve_config_path
from nemotron.config.loader import available_configs
from nemotron.data.blended import build_blending_indices
from nemotron.train.plan import phase2_start_step, plan_batches
from nemotron.train.schedule import LRSchedule


def recipe(name: str) -> PretrainConfig:
    return load_config(resolve_config_path(name, PretrainConfig), [], PretrainConfig)


def layout(cfg) -> tuple:
    p = cfg.model.parallel()
    return (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.expert_model_parallel_size,
        p.context_parallel_size,
        p.sequence_parallel,
    )


def test_every_shipped_recipe_is_checked_here():
    assert set(available_configs(PretrainConfig)) == {"default", "long_context", "tiny", "long_context_tiny"}


def test_the_main_recipe_is_the_reports_run():
    cfg = recipe("default")
    t, o, s, d = cfg.train, cfg.optimizer, cfg.scheduler, cfg.data
    assert (t.global_batch_size, t.seq_length, t.train_tokens, t.train_iters) == (
        3072,
        8192,
        25 * 10**12,
        None,
    )
    assert (o.lr, o.min_lr, o.beta1, o.beta2, o.weight_decay) == (1e-3, 1e-5, 0.9, 0.95, 0.1)
    assert (s.style, s.warmup_tokens, s.stable_fraction_end, s.decay_style) == (
        "wsd",
        8_400_000_000,
        0.8,
        "cosine",
    )
    assert layout(cfg) == (8, 1, 8, 1, True)  # TP8 PP1 EP8 CP1, SP on
    assert d.phase2_blend and d.phase2_start_fraction == 0.94 and not d.mixed_length_blends

    plan = plan_batches(t, dp_size=1, data=d)
    tokens_per_step = 3072 * 8192  # 25,165,824
    assert plan.tokens_per_step == tokens_per_step
    assert plan.total_steps == -(-25 * 10**12 // tokens_per_step) == 993_411
    # Phase 2 from the first step starting at >= 94% of the run's tokens: 23.5T of 25T.
    switch = phase2_start_step(plan, d)
    assert switch == math.ceil(Fraction(94, 100) * 993_411) == 933_807
    assert (switch - 1) * tokens_per_step < 0.94 * plan.total_tokens <= switch * tokens_per_step
    assert abs(switch * tokens_per_step - 23.5e12) < tokens_per_step
    # WSD in tokens: 8.4B warmup (~333 steps), 1e-3 until 80% of tokens, 1e-5 at the end.
    lr = LRSchedule.from_config(s, o, plan.total_tokens)
    assert 8_400_000_000 // tokens_per_step == 333
    assert lr.rate(0) == 0.0 and lr.rate(4_200_000_000) == pytest.approx(5e-4, rel=1e-12)
    assert lr.rate(8_400_000_000) == 1e-3
    decay_start = 0.8 * plan.total_tokens
    assert lr.rate(int(decay_start) - 1) == 1e-3 and lr.rate(int(decay_start) + 10**9) < 1e-3
    assert lr.rate(plan.total_tokens) == pytest.approx(1e-5, rel=1e-12)


def test_the_long_context_recipe_is_the_reports_lc_phase():
    cfg = recipe("long_context")
    t, o, s, d = cfg.train, cfg.optimizer, cfg.scheduler, cfg.data
    assert (t.global_batch_size, t.micro_batch_size, t.train_tokens, t.train_iters) == (
        48,
        1,
        121 * 10**9,
        None,
    )
    assert s.style == "constant" and o.lr == 1e-5 and (o.beta1, o.beta2, o.weight_decay) == (0.9, 0.95, 0.1)
    assert layout(cfg) == (8, 4, 8, 8, True)  # TP8 PP4 EP8 CP8, SP on
    assert cfg.checkpoint.finetune and not d.phase2_blend
    # 512K-token samples mixed one for one with 4K-token ones.
    assert t.seq_length == 512 * 1024
    assert [(m.seq_length, m.weight) for m in d.mixed_length_blends] == [
        (4096, 1.0)
    ] and d.blend_weight == 1.0
    # A global batch: the blending rule on weights 1:1 alternates, 24 long + 24 short samples,
    # so every step (not only on average) holds 48 x 264,192 tokens.
    which, _ = build_blending_indices([1.0, 1.0], 48 * 3)
    for step in range(3):
        batch = which[step * 48 : (step + 1) * 48].tolist()
        assert batch == [0, 1] * 24
    plan = plan_batches(t, dp_size=1, data=d)
    mean = (524_288 + 4096) / 2
    assert plan.mean_sample_length == mean == 264_192
    assert plan.tokens_per_step == 48 * 264_192
    assert plan.total_steps == math.ceil(121e9 / (48 * 264_192)) == 9542
    lr = LRSchedule.from_config(s, o, plan.total_tokens)
    assert {lr.rate(x) for x in (0, 10**9, plan.total_tokens // 2, plan.total_tokens)} == {1e-5}


@pytest.mark.parametrize("name", ["tiny", "long_context_tiny"])
def test_the_cpu_recipes_are_runnable_plans(name):
    """The CPU recipes are the others in miniature: their own numbers, but plans that hold."""
    cfg = recipe(name)
    plan = plan_batches(cfg.train, dp_size=1, data=cfg.data)
    assert plan.total_steps == cfg.train.train_iters and cfg.train.device == "cpu"
    assert cfg.model.vocab_size == 4096
    if name == "long_context_tiny":
        assert cfg.scheduler.style == "constant" and cfg.checkpoint.finetune
        assert layout(cfg)[1] == 2 and [m.seq_length for m in cfg.data.mixed_length_blends] == [64]
    else:
        assert cfg.scheduler.style == "wsd" and layout(cfg) == (1, 1, 1, 1, False)
