"""The Trainer's step is the library's one step (the benchmarks time it), and a run resolves
its compute weights once."""

from __future__ import annotations

import copy

import torch

from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.train import balancing, pretrain
from nemotron.train import loop as loop_module
from nemotron.train.data import TrainingData, plan_batches
from nemotron.train.loop import Parallel, train_step
from nemotron.train.optimizer import build_optimizer, set_learning_rate
from nemotron.train.schedule import learning_rate
from nemotron.train.trainer import Trainer

from .conftest import make_config


def test_trainer_step_is_train_step_plus_the_expert_bias_update(corpus, tmp_path):
    cfg = make_config(tmp_path, blend=corpus[0], checkpoint={"save": None})
    plan = plan_batches(cfg.train, 1, cfg.data)
    torch.manual_seed(0)
    model = Nano3ForCausalLM(cfg.model.arch())
    by_hand = copy.deepcopy(model)
    trainer = Trainer(
        cfg, model, Parallel(), TrainingData(cfg.data, cfg.train, plan, 64, 0), device=torch.device("cpu")
    )
    optimizer = build_optimizer(by_hand, cfg.optimizer)
    data = TrainingData(cfg.data, cfg.train, plan, 64, 0)
    tokens = 0
    for _ in range(4):
        outcome = trainer.step()
        lr = learning_rate(tokens, plan.total_tokens, cfg.scheduler, cfg.optimizer)
        set_learning_rate(optimizer, lr)
        result = train_step(
            by_hand,
            optimizer,
            data.next_train_batches(),
            device=torch.device("cpu"),
            precision="fp32",
            grad_clip=cfg.train.grad_clip,
        )
        stats = balancing.update_expert_biases(by_hand.moe_layers(), cfg.train.expert_bias_update_rate)
        tokens += data.last_step_tokens
        assert outcome.result == result and outcome.lr == lr
        assert outcome.balance.max_over_mean == stats.max_over_mean
    assert trainer.state.step == 4 and trainer.state.tokens == tokens
    for (name, a), (_, b) in zip(model.state_dict().items(), by_hand.state_dict().items()):
        assert torch.equal(a, b), name  # weights and expert biases, bit for bit


def test_compute_weights_are_resolved_once_per_run(corpus, tmp_path, monkeypatch):
    calls = []
    original = loop_module.check_compute_weights
    monkeypatch.setattr(
        loop_module,
        "check_compute_weights",
        lambda train: calls.append(train.compute_weights) or original(train),
    )
    events = []
    cfg = make_config(tmp_path, blend=corpus[0], train={"train_iters": 2})
    pretrain(cfg, tmp_path / "job", on_event=lambda kind, p: events.append((kind, p)))
    assert calls == ["auto"]
    assert [p["compute_weights"] for kind, p in events if kind == "start"] == ["fp32"]
