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


def test_compile_with_a_pipeline_layout_reaches_the_run(tmp_path, monkeypatch):
    """`train.compile` with `model.pipeline_model_parallel_size=2`: one process trains the whole
    model (docs/execution.md) and compiles it; two processes compile each stage's blocks
    (`train.loop.compile_model`). Neither is refused before the run is built (two processes
    were, when the stages were not compiled)."""
    import dataclasses

    import pytest

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
    # two processes pass the layout checks and go on to join their process group (this test
    # starts none: the launcher's error, not a ParallelLayoutError)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="start the processes with torchrun"):
        trainer.pretrain(cfg, tmp_path / "job")
