"""Learning rate, weight decay and weight-decay groups against Megatron-Core itself.

The fixture (tests/train/fixtures/megatron_optim.json) was computed by megatron-core 0.16.1's
`OptimizerParamScheduler` and its standard parameter-group overrides
(tests/train/make_megatron_optim_fixtures.py says how), so these tests need no Megatron. Each
case is compared step by step (every iteration's rate, exactly), never through an aggregate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nemotron.config.schema import ModelConfig
from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.train.config import OptimizerConfig, SchedulerConfig
from nemotron.train.optimizer import build_optimizer, is_no_decay, set_learning_rate
from nemotron.train.schedule import LRSchedule, validate_schedule
from nemotron.train.trainer import RunState

from .conftest import TINY_MODEL

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "megatron_optim.json").read_text())
SCHEDULES = {case["name"]: case for case in FIXTURE["schedules"]}


def our_schedule(case: dict) -> LRSchedule:
    sched = SchedulerConfig(**case["ours"]["scheduler"])
    opt = OptimizerConfig(**case["ours"]["optimizer"])
    validate_schedule(sched, opt)
    return LRSchedule.from_config(sched, opt, case["ours"]["total_tokens"])


def our_rates(case: dict) -> list[float]:
    """The rate of every step as the trainer sets it: from the tokens of the applied steps
    before it (`RunState.schedule_tokens`), a skipped step leaving the schedule where it was."""
    schedule = our_schedule(case)
    state = RunState()
    rates = []
    for step in range(1, len(case["rates"]) + 1):
        rates.append(schedule.rate(state.schedule_tokens))
        state.advance(step not in case["skipped"], case["ours"]["tokens_per_step"])
    return rates


def same(ours: float, theirs: float) -> bool:
    """Equal up to the last bits: Megatron rounds (lr x samples) / warmup samples, ours
    (lr x tokens) / warmup tokens, and its stable phase is min_lr + 1.0 x (lr - min_lr)."""
    return ours == pytest.approx(theirs, rel=1e-15, abs=0)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_step_rate_is_megatrons(name):
    case = SCHEDULES[name]
    ours, theirs = our_rates(case), case["rates"]
    mismatches = [(step, a, b) for step, (a, b) in enumerate(zip(ours, theirs), start=1) if not same(a, b)]
    assert not mismatches, f"{name}: (step, ours, Megatron's) {mismatches}"


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_megatrons_logged_rate_is_the_next_steps(name):
    """docs/training.md: Megatron's logged `learning-rate` of iteration N is the rate of
    iteration N + 1 (ours logs the step's own), and at a skipped iteration the two agree."""
    case = SCHEDULES[name]
    ours, logged = our_rates(case), case["logged"]
    for step in range(1, len(ours)):
        assert same(ours[step], logged[step - 1]), (name, step)
        if step in case["skipped"]:
            assert same(ours[step - 1], logged[step - 1]), (name, step)


def test_weight_decay_is_megatrons_constant_one_per_group():
    """Megatron's scheduler sets every group's weight decay at every step to
    weight_decay x wd_mult (constant style: start = end = weight_decay): 0.1 on the decayed
    group, 0 on the other. Ours sets only the rate per step; the groups keep theirs."""
    case = SCHEDULES["skipped iterations"]
    model = Nano3ForCausalLM(ModelConfig(**TINY_MODEL).arch())
    opt = build_optimizer(model, OptimizerConfig(**case["ours"]["optimizer"]))
    decayed = [g["weight_decay"] != 0.0 for g in opt.param_groups]
    assert decayed == [True, False]
    for rate, (wd_decayed, wd_other) in zip(our_rates(case), case["weight_decays"]):
        set_learning_rate(opt, rate)
        assert [g["weight_decay"] for g in opt.param_groups] == [wd_decayed, wd_other]


def test_every_parameter_of_the_hybrid_model_decays_as_in_megatron():
    """Megatron exempts every 1-D parameter and every `*.bias` (wd_mult 0) and decays the rest:
    Mamba's A_log, D, dt_bias, conv1d.bias and norms are exempt; conv1d.weight (3-D), the
    embedding, the LM head, the router and the experts decay. The expert bias is a buffer."""
    model = Nano3ForCausalLM(ModelConfig(**TINY_MODEL).arch())
    params = dict(model.named_parameters())
    assert set(params) == set(FIXTURE["groups"]["tiny_model"])
    groups = {
        g["weight_decay"]: set(g["names"]) for g in build_optimizer(model, OptimizerConfig()).param_groups
    }
    for name, wd_mult in FIXTURE["groups"]["tiny_model"].items():
        assert is_no_decay(name, params[name]) == (wd_mult == 0.0), name
        assert name in groups[0.1 * wd_mult], name


@pytest.mark.parametrize("case", FIXTURE["groups"]["synthetic"], ids=lambda c: c["name"])
def test_megatrons_rule_on_other_names_and_shapes(case):
    param = torch.nn.Parameter(torch.empty(case["shape"]))
    assert is_no_decay(case["name"], param) == (case["wd_mult"] == 0.0)
