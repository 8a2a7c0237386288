"""Train-config switches that `build_model` applies to the model it builds."""

from __future__ import annotations

import torch

from nemotron.models.nano3 import MoE
from nemotron.train.loop import build_model

from .conftest import make_config


def test_train_config_switches_shared_expert_overlap(tmp_path):
    for enabled in (False, True):
        cfg = make_config(tmp_path, train={"moe_shared_expert_overlap": enabled})
        model, _ = build_model(cfg, torch.device("cpu"))
        layers = [m for m in model.modules() if isinstance(m, MoE)]
        assert layers and all(m.shared_expert_overlap is enabled for m in layers)


def test_one_process_ignores_the_pipeline_layout_for_compile(tmp_path, monkeypatch):
    """One process trains the whole model whatever the configured layout (docs/execution.md),
    so `train.compile` with `model.pipeline_model_parallel_size=2` compiles that model; it was
    refused there (after the CLI had made the job dir), although the dry run passed it. Under
    two processes the same config is still refused before anything is built."""
    import dataclasses

    import pytest

    from nemotron.distributed.parallel_dims import ParallelLayoutError
    from nemotron.train import trainer

    cfg = make_config(tmp_path, train={"compile": True})
    cfg.model = dataclasses.replace(cfg.model, pipeline_model_parallel_size=2)

    class Reached(Exception):
        pass

    def for_run(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(trainer.Trainer, "for_run", for_run)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(Reached):
        trainer.pretrain(cfg, tmp_path / "job")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ParallelLayoutError, match="train.compile=true with model.pipeline_model_parallel_size=2"
    ):
        trainer.pretrain(cfg, tmp_path / "job")
